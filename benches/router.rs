//! Classification time per request. The keyword rules (target: median under 50 µs) and
//! the learned classifier (target: under 5 ms for a 500-token prompt on the 2-core dev
//! VM), whose time is tokenizing the instruction (its ends, cut to the head's
//! `max_tokens` word pieces) and averaging all-minilm's input vectors of them.
//! `cargo bench --bench router`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use duet::config::{Config, BUILTIN_MODELS_TOML};
use duet::router::{Classifier, Request};
use std::sync::Arc;

fn prompts() -> Vec<String> {
    let text = include_str!("../tests/routing/dev.jsonl");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["prompt"].as_str().map(str::to_string))
        .collect()
}

/// A 500-token prompt of prose (what the embedding has to cut) and one of a short ask
/// with code attached (what the instruction split leaves out), as the Qwen tokenizer
/// counts them (about 500 each).
fn long_prompts() -> (String, String) {
    let prose = "We run an online shop whose checkout has grown slow and fragile over the years, \
        and the team wants a plan to rebuild the payment step so that retries, refunds and \
        partial captures are handled in one place with clear logs for support staff. "
        .repeat(10);
    let code = format!(
        "Add a docstring to the first function:\n```python\n{}```",
        "def total(items):\n    return sum(i.price * i.qty for i in items)\n".repeat(22)
    );
    (prose, code)
}

fn bench(c: &mut Criterion) {
    let cfg = Config::parse(BUILTIN_MODELS_TOML, "built-in", ".".into()).expect("built-in config");
    let classifier = Classifier::new(cfg.routing.clone()).expect("rules");
    let prompts = prompts();
    assert!(!prompts.is_empty());
    let mut i = 0;
    c.bench_function("rules: classify one request (dev set, round robin)", |b| {
        b.iter(|| {
            i = (i + 1) % prompts.len();
            black_box(classifier.classify(&Request {
                prompt: &prompts[i],
                system: None,
                turns: 1,
                num_predict: None,
            }))
        })
    });
    let long = format!(
        "Refactor this module to remove duplication:\n```python\n{}```",
        "def f(x):\n    return x + 1\n".repeat(200)
    );
    c.bench_function("rules: classify a request with 400 lines of code", |b| {
        b.iter(|| {
            black_box(classifier.classify(&Request {
                prompt: &long,
                system: Some("You are a helpful assistant."),
                turns: 3,
                num_predict: Some(512),
            }))
        })
    });

    // The learned classifier needs all-minilm in the hf-hub cache.
    let embedder = match duet::router::cli::load_embedder(&cfg) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("skipping the learned classifier's benchmarks: {e}");
            return;
        }
    };
    let head = duet::router::learned::Head::builtin();
    let learned = |max_tokens: usize| {
        let e = embedder.clone();
        let mut h = head.clone();
        h.max_tokens = max_tokens;
        Classifier::new(cfg.routing.clone())
            .expect("rules")
            .with_learned(h, Arc::new(move || Ok(e.clone())))
    };
    let default = learned(head.max_tokens);
    let mut i = 0;
    c.bench_function(
        "learned: classify one request (dev set, round robin)",
        |b| {
            b.iter(|| {
                i = (i + 1) % prompts.len();
                black_box(default.classify(&Request {
                    prompt: &prompts[i],
                    system: None,
                    turns: 1,
                    num_predict: None,
                }))
            })
        },
    );
    let (prose, code) = long_prompts();
    for (name, prompt) in [
        ("500 tokens of prose", &prose),
        ("500 tokens, mostly code", &code),
    ] {
        let req = Request {
            prompt,
            system: None,
            turns: 1,
            num_predict: None,
        };
        c.bench_function(
            &format!("learned: {name} (instruction cut to {})", head.max_tokens),
            |b| b.iter(|| black_box(default.classify(&req))),
        );
    }
    // A bounded time whatever the size: a megabyte of prose (the rules still read all
    // of it; the embedding reads its ends).
    let huge = prose.repeat((1 << 20) / prose.len());
    let req = Request {
        prompt: &huge,
        system: None,
        turns: 1,
        num_predict: None,
    };
    c.bench_function("learned: 1 MB of prose", |b| {
        b.iter(|| black_box(default.classify(&req)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
