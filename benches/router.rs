//! Classification time per request (target: median under 50 µs on the 2-core dev VM).
//! Runs the classifier over every prompt of the routing dev set copied in tests/routing.
//! `cargo bench --bench router`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use duet::config::{Config, BUILTIN_MODELS_TOML};
use duet::router::{Classifier, Request};

fn prompts() -> Vec<String> {
    let text = include_str!("../tests/routing/dev.jsonl");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["prompt"].as_str().map(str::to_string))
        .collect()
}

fn bench(c: &mut Criterion) {
    let cfg = Config::parse(BUILTIN_MODELS_TOML, "built-in", ".".into()).expect("built-in config");
    let classifier = Classifier::new(cfg.routing).expect("rules");
    let prompts = prompts();
    assert!(!prompts.is_empty());
    let mut i = 0;
    c.bench_function("classify one request (dev set, round robin)", |b| {
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
    c.bench_function("classify a request with 400 lines of code", |b| {
        b.iter(|| {
            black_box(classifier.classify(&Request {
                prompt: &long,
                system: Some("You are a helpful assistant."),
                turns: 3,
                num_predict: Some(512),
            }))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
