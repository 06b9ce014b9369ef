//! Parity with a peer engine (llama.cpp) on the real 0.5B and 1.5B files: tokenization,
//! chat-template rendering and greedy continuations.

mod common;
use common::*;
use duet::engine::{GgufFile, Message, Model, Options, TextCodec};

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
            duet::engine::ChatTemplate::new(info.chat_template.as_deref().unwrap()).unwrap();
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

fn greedy(model: &Model, file: &str) {
    let v = vectors(file);
    let opts = Options {
        temperature: 0.0,
        num_predict: 16,
        ..Options::default()
    };
    for case in v["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        // The prompt ids are what our tokenizer makes of the prompt text too.
        assert_eq!(
            model.tokenize(case["prompt"].as_str().unwrap()).unwrap(),
            prompt
        );
        let want = ids(&case["greedy_ids"]);
        let want = &want[..want.len().min(16)];
        let mut g = model.generate(prompt, &opts).unwrap();
        g.collect_text().unwrap();
        // The reference lists the end-of-turn token it stopped at; we stop on it and do
        // not count it as output, as Ollama does.
        match want.split_last() {
            Some((last, body)) if model.codec.is_stop(*last) => {
                assert_eq!(g.generated(), body, "{}: {:?}", model.name, case["prompt"]);
                assert_eq!(g.summary().done_reason, duet::engine::DoneReason::Stop);
            }
            _ => assert_eq!(g.generated(), want, "{}: {:?}", model.name, case["prompt"]),
        }
    }
}

#[test]
fn greedy_matches_reference_first_16_tokens_small() {
    greedy(small(), "greedy-qwen2.5-coder-0.5b-instruct-q4_k_m.json");
}

#[test]
fn greedy_matches_reference_first_16_tokens_large() {
    greedy(large(), "greedy-qwen2.5-coder-1.5b-instruct-q4_k_m.json");
}
