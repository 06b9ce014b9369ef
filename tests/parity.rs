//! Parity with a peer engine (llama.cpp) on the real 0.5B and 1.5B files: tokenization,
//! chat-template rendering and greedy continuations.

mod common;
use candle_core::Device;
use common::*;
use duet::model::qwen2::Qwen2;
use duet::model::{GgufFile, Message, Model, TextCodec};
use duet::serving::Options;

fn codec(name: &str) -> TextCodec {
    TextCodec::load(&GgufFile::open(&weights(name)).unwrap()).unwrap()
}

#[test]
fn tokenization_matches_reference_for_every_case() {
    let v = vectors("tokenize.json");
    for name in [SMALL, LARGE] {
        let codec = codec(name);
        for case in v["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(codec.encode(text).unwrap(), want, "{name}: {text:?}");
            // And back: decoding the ids gives the text again.
            assert_eq!(codec.decode(&want).unwrap(), text, "{name}: {text:?}");
        }
    }
}

#[test]
fn chat_template_renders_byte_for_byte() {
    let v = vectors("chat_template.json");
    for name in [SMALL, LARGE] {
        let gguf = GgufFile::open(&weights(name)).unwrap();
        let info = gguf.info().unwrap();
        let template =
            duet::model::ChatTemplate::new(info.chat_template.as_deref().unwrap()).unwrap();
        for case in v["cases"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render(&messages, add).unwrap();
            assert_eq!(
                got,
                case["prompt"].as_str().unwrap(),
                "{name}: {messages:?}"
            );
        }
    }
}

/// With tools, calls and tool results: the template renders as transformers renders it
/// (jinja2; `scripts/vectors/render_tools.py` made the vectors).
#[test]
fn chat_template_with_tools_renders_byte_for_byte() {
    let v = vectors("chat_template_tools.json");
    for name in [SMALL, LARGE] {
        let gguf = GgufFile::open(&weights(name)).unwrap();
        let info = gguf.info().unwrap();
        let template =
            duet::model::ChatTemplate::new(info.chat_template.as_deref().unwrap()).unwrap();
        let file = weights(name);
        let file = file.file_name().unwrap().to_str().unwrap();
        let prompts = v["prompts"][file].as_array().unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(prompts.len(), cases.len());
        for (case, want) in cases.iter().zip(prompts) {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let tools = case["tools"].as_array().unwrap();
            let got = template
                .render_with_tools(&messages, Some(tools), true)
                .unwrap();
            assert_eq!(got, want.as_str().unwrap(), "{name}: {messages:?}");
        }
    }
}

/// Two tokens whose logits are closer than this are a tie that rounding decides, not the
/// model: the reference engine's kernels and ours round differently, and two of our own
/// kernels of equal accuracy (prompt tiles against single rows for the 0.5B's Q6_K
/// matrices, both within 2e-6 of the exact product) moved the 0.5B's "git rebase" margin
/// from +0.080 to -0.009 logits. With the f16 cache this model family is that sensitive:
/// the paged attention kernel and candle's matmuls agree to 1e-6 per layer, yet the
/// 1.5B's logits after a two-token prompt differ by up to 0.6 between them (a last-bit
/// change in a key flips its f16 rounding, and layer 0's scores reach 2,700), and moving
/// prefill attention onto the kernel moved the "git rebase" margin from 0.063 to 0.110.
/// A wrong kernel moves the top logits by whole units.
const NEAR_TIE: f32 = 0.15;

/// Each vector's first 16 greedy tokens, two ways:
/// - teacher-forced through the forward pass: at every step the reference's token must
///   be our top token, or within [`NEAR_TIE`] of it; at most one case per model may
///   need that allowance;
/// - through the generation API: our greedy answer must equal the reference's, up to
///   the first near tie where there is one.
fn greedy(model: &Model, name: &str, file: &str) {
    let v = vectors(file);
    let path = weights(name);
    let gguf = GgufFile::open(&path).unwrap();
    let qwen = Qwen2::load(&gguf, &gguf.info().unwrap(), &Device::Cpu).unwrap();
    let opts = Options {
        temperature: 0.0,
        num_predict: 16,
        ..Options::default()
    };
    let mut ties = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let text = case["prompt"].as_str().unwrap();
        // The prompt ids are what our tokenizer makes of the prompt text too.
        assert_eq!(model.tokenize(text).unwrap(), prompt);
        let want = ids(&case["greedy_ids"]);
        let want = &want[..want.len().min(16)];

        let mut cache = qwen.new_cache(prompt.len() + want.len()).unwrap();
        let mut feed = prompt.clone();
        let mut first_tie = None;
        for (step, &token) in want.iter().enumerate() {
            let logits: Vec<f32> = qwen
                .forward(&feed, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let top = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap();
            if top != token as usize {
                let gap = logits[top] - logits[token as usize];
                assert!(
                    gap < NEAR_TIE,
                    "{name}: {text:?} step {step}: our token {top} beats the reference's {token} by {gap} logits"
                );
                ties.push(format!("{text:?} step {step}: {top} over {token} by {gap}"));
                first_tie.get_or_insert(step);
            }
            feed = vec![token];
        }

        let mut g = model.generate(prompt, &opts).unwrap();
        g.collect_text().unwrap();
        if let Some(step) = first_tie {
            assert_eq!(&g.generated()[..step], &want[..step], "{name}: {text:?}");
            continue;
        }
        // The reference lists the end-of-turn token it stopped at; we stop on it and do
        // not count it as output, as Ollama does.
        match want.split_last() {
            Some((last, body)) if model.codec.is_stop(*last) => {
                assert_eq!(g.generated(), body, "{name}: {text:?}");
                assert_eq!(g.summary().done_reason, duet::serving::DoneReason::Stop);
            }
            _ => assert_eq!(g.generated(), want, "{name}: {text:?}"),
        }
    }
    assert!(ties.len() <= 1, "{name}: more than one near tie: {ties:?}");
    for tie in ties {
        println!("{name}: near tie {tie}");
    }
}

#[test]
fn greedy_matches_reference_first_16_tokens_small() {
    greedy(
        small(),
        SMALL,
        "greedy-qwen2.5-coder-0.5b-instruct-q4_k_m.json",
    );
}

#[test]
fn greedy_matches_reference_first_16_tokens_large() {
    greedy(
        large(),
        LARGE,
        "greedy-qwen2.5-coder-1.5b-instruct-q4_k_m.json",
    );
}

/// The GPU's attention path (the cache in tensors, candle's operations), run on the CPU,
/// picks the CPU path's greedy tokens on every vector's prompt and first answer tokens,
/// up to near ties.
#[test]
fn the_tensor_attention_path_agrees_with_the_cpu_kernels() {
    let v = vectors("greedy-qwen2.5-coder-0.5b-instruct-q4_k_m.json");
    let gguf = GgufFile::open(&weights(SMALL)).unwrap();
    let qwen = Qwen2::load(&gguf, &gguf.info().unwrap(), &Device::Cpu).unwrap();
    let top = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
    for case in v["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let mut host = qwen.new_cache(prompt.len() + 8).unwrap();
        let mut tensors = qwen.new_cache_on_tensors(prompt.len() + 8).unwrap();
        let mut feed = prompt.clone();
        for &next in want.iter().take(6) {
            let a: Vec<f32> = qwen.forward(&feed, &mut host).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = qwen
                .forward(&feed, &mut tensors)
                .unwrap()
                .to_vec1()
                .unwrap();
            let (ta, tb) = (top(&a), top(&b));
            assert!(
                ta == tb || a[ta] - a[tb] < NEAR_TIE,
                "paths disagree: {ta} ({}) vs {tb} ({})",
                a[ta],
                a[tb]
            );
            feed = vec![next];
        }
    }
}
