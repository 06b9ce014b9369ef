//! Many users at once, through a real `duet serve` with the 0.5B: several sequences of
//! one model advance in the same forward passes, each gets the answer it gets alone,
//! seeded sampling does not depend on what else runs, and a conversation's next turn
//! starts from the prefix cache.

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::Server;

fn server() -> (tempfile::TempDir, Server) {
    let dir = small_only();
    let cfg = dir.path().join("models.toml");
    let srv = server::start_with(&["--config", cfg.to_str().unwrap()], &["--parallel", "4"]);
    (dir, srv)
}

/// A counter or gauge of /metrics for `model` (0 when absent).
fn metric(srv: &Server, name: &str, model: &str) -> f64 {
    srv.metric(name, &[&format!("model=\"{model}\"")])
}

fn generate(srv: &Server, prompt: &str, options: Value) -> Value {
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": prompt, "stream": false, "options": options,
               "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(status, 200, "{v}");
    v
}

/// Runs the requests at the same moment, each on a thread of its own.
fn together(srv: &Server, reqs: &[(&str, Value)]) -> Vec<Value> {
    std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|(p, o)| s.spawn(move || generate(srv, p, o.clone())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

const PROMPTS: [&str; 4] = [
    "Write a Python function that reverses a string.",
    "What does the `ls -la` command print?",
    "def fibonacci(n):",
    "Explain in one sentence what a mutex is.",
];

/// Greedy answers agree token by token, up to the first place where the answer alone
/// had two candidates within a near tie (the model's rounding decides there).
fn same_up_to_a_near_tie(alone: &Value, batched: &Value) {
    let tokens = |v: &Value| -> Vec<(String, f64, f64)> {
        v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let top = t["top_logprobs"].as_array().unwrap();
                let lp = |i: usize| {
                    top.get(i)
                        .map_or(f64::NEG_INFINITY, |x| x["logprob"].as_f64().unwrap())
                };
                (t["token"].as_str().unwrap().to_string(), lp(0), lp(1))
            })
            .collect()
    };
    let (a, b) = (tokens(alone), tokens(batched));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if x.0 != y.0 {
            let gap = x.1 - x.2;
            assert!(
                gap < 0.15,
                "token {i}: alone {:?}, batched {:?}, though alone's top two were {gap} apart",
                x.0,
                y.0
            );
            return;
        }
    }
    assert_eq!(alone["response"], batched["response"]);
}

#[test]
fn sequences_share_steps_and_keep_their_own_answers() {
    let (_dir, srv) = server();
    let greedy = json!({"temperature": 0, "num_predict": 24});
    let alone: Vec<Value> = PROMPTS
        .iter()
        .map(|p| generate(&srv, p, greedy.clone()))
        .collect();
    let before = metric(&srv, "duet_batched_decode_steps_total", SMALL);
    // A seeded sampled request among greedy ones: the same text as when it ran alone.
    let seeded = json!({"temperature": 0.8, "seed": 7, "num_predict": 24});
    let seeded_alone = generate(&srv, PROMPTS[0], seeded.clone());
    let reqs: Vec<(&str, Value)> = PROMPTS
        .iter()
        .map(|p| (*p, greedy.clone()))
        .chain([(PROMPTS[0], seeded.clone())])
        .collect();
    let batched = together(&srv, &reqs);
    let after = metric(&srv, "duet_batched_decode_steps_total", SMALL);
    assert!(
        after - before >= 10.0,
        "several sequences should decode in the same steps: {before} -> {after}"
    );
    for (a, b) in alone.iter().zip(&batched) {
        same_up_to_a_near_tie(a, b);
        assert_eq!(a["prompt_eval_count"], b["prompt_eval_count"]);
    }
    assert_eq!(
        seeded_alone["response"], batched[4]["response"],
        "seeded sampling must not depend on the other requests in the batch"
    );
}

#[test]
fn the_next_turn_of_a_conversation_starts_from_the_prefix_cache() {
    let (_dir, srv) = server();
    let code = "def area(shape, *dims):\n    if shape == 'circle':\n        return 3.14159 * dims[0] ** 2\n    if shape == 'rect':\n        return dims[0] * dims[1]\n    raise ValueError(shape)\n".repeat(3);
    let mut messages = vec![
        json!({"role": "system", "content": "You are a careful code reviewer."}),
        json!({"role": "user", "content": format!("Review this code:\n{code}")}),
    ];
    let body = |messages: &Vec<Value>| {
        json!({"model": SMALL, "messages": messages,
               "max_tokens": 16, "temperature": 0})
    };
    let (s, first) = srv.post("/v1/chat/completions", body(&messages));
    assert_eq!(s, 200, "{first}");
    let hits_before = metric(&srv, "duet_prefix_cache_hit_tokens_total", SMALL);
    messages.push(first["choices"][0]["message"].clone());
    messages.push(json!({"role": "user", "content": "Now suggest a better name for it."}));
    let (s, second) = srv.post("/v1/chat/completions", body(&messages));
    assert_eq!(s, 200, "{second}");
    let usage = &second["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    // Everything up to the first turn's prompt (whole blocks of it) came from the cache;
    // prompt_tokens still counts the whole prompt, as Ollama's prompt_eval_count does.
    assert!(prompt > first_prompt);
    assert!(
        cached >= first_prompt - 32 && cached < prompt,
        "cached {cached} of {prompt} (first turn {first_prompt})"
    );
    let hits = metric(&srv, "duet_prefix_cache_hit_tokens_total", SMALL) - hits_before;
    assert_eq!(hits as u64, cached);

    // The same answer as without the cache (a fresh server computes the whole prompt).
    let (_dir2, cold) = server();
    let (_, uncached) = cold.post("/v1/chat/completions", body(&messages));
    assert_eq!(
        uncached["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(
        uncached["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
}
