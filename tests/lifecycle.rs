//! Model lifecycle as Ollama has it, on a real `duet serve` with the 0.5B model:
//! keep_alive (0 unloads, a duration expires), load on demand, requests that arrive
//! while their model loads wait for it, /api/ps with the true expiry.

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::{client, Server};

fn post(srv: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", srv.base))
        .json(&body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

fn ps(srv: &Server) -> Vec<Value> {
    let v: Value = client()
        .get(format!("{}/api/ps", srv.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["models"].as_array().unwrap().clone()
}

fn loaded(srv: &Server) -> bool {
    ps(srv).iter().any(|m| m["model"] == SMALL)
}

fn generate(srv: &Server, extra: Value) -> (u16, Value) {
    let mut body = json!({"model": SMALL, "prompt": "def add(a, b):", "raw": true, "stream": false,
                          "options": {"temperature": 0, "num_predict": 4}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    post(srv, "/api/generate", body)
}

/// Seconds from now until an RFC 3339 time.
fn secs_until(rfc3339: &str) -> f64 {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
    (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0
}

#[test]
fn keep_alive_zero_unloads_and_the_next_request_loads_again() {
    let dir = small_only();
    let cfg = dir.path().join("models.toml");
    let srv = server::start_with(&["--config", cfg.to_str().unwrap()], &["--no-preload"]);
    // Not preloaded: nothing in memory until the first request, which loads and waits.
    assert!(!loaded(&srv), "{:?}", ps(&srv));
    let (status, first) = generate(&srv, json!({}));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["eval_count"], 4);
    assert!(
        first["load_duration"].as_u64().unwrap() > 1_000_000,
        "{first}"
    );
    assert!(loaded(&srv));
    // Ollama's default server keep-alive here is forever: expires_at is far ahead.
    let m = ps(&srv)[0].clone();
    assert!(
        secs_until(m["expires_at"].as_str().unwrap()) > 365.0 * 86400.0,
        "{m}"
    );

    // The same request again: the model is in memory, no load time.
    let (_, again) = generate(&srv, json!({}));
    assert_eq!(again["response"], first["response"]);
    assert!(again["load_duration"].as_u64().unwrap() < first["load_duration"].as_u64().unwrap());

    // An empty prompt with keep_alive 0 unloads (Open WebUI's eject, `ollama stop`).
    let (status, v) = generate(&srv, json!({"prompt": "", "keep_alive": 0}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done_reason"], "unload");
    assert_eq!(v["done"], true);
    wait_until("the unload", 60, || !loaded(&srv));

    // The next request loads it again and answers the same.
    let (status, v) = generate(&srv, json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["response"], first["response"]);
    assert!(loaded(&srv));

    // A request with keep_alive 0 is answered, then the model unloads.
    let (status, v) = generate(&srv, json!({"keep_alive": "0s"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["response"], first["response"]);
    wait_until("the unload after the request", 60, || !loaded(&srv));

    // An empty prompt without keep_alive 0 loads the model (done_reason "load"); chat's
    // empty messages do the same.
    let (_, v) = generate(&srv, json!({"prompt": ""}));
    assert_eq!(v["done_reason"], "load", "{v}");
    assert!(loaded(&srv));
    let (_, v) = post(
        &srv,
        "/api/chat",
        json!({"model": SMALL, "messages": [], "keep_alive": 0}),
    );
    assert_eq!(v["done_reason"], "unload", "{v}");
    assert_eq!(v["message"]["content"], "");
    wait_until("the chat unload", 60, || !loaded(&srv));
    let (_, v) = post(&srv, "/api/chat", json!({"model": SMALL, "messages": []}));
    assert_eq!(v["done_reason"], "load", "{v}");
    assert!(loaded(&srv));
}

#[test]
fn a_keep_alive_duration_expires_and_shows_in_ps() {
    let dir = small_only();
    let cfg = dir.path().join("models.toml");
    let srv = server::start_with(
        &["--config", cfg.to_str().unwrap()],
        &["--keep-alive", "10m"],
    );
    // Preloaded at start; the server default (--keep-alive / OLLAMA_KEEP_ALIVE) applies.
    let m = ps(&srv)[0].clone();
    let left = secs_until(m["expires_at"].as_str().unwrap());
    assert!((500.0..=600.0).contains(&left), "{m}");
    // A request's own keep_alive wins: 2 seconds, then the model unloads by itself.
    let (status, v) = generate(&srv, json!({"keep_alive": "2s"}));
    assert_eq!(status, 200, "{v}");
    let m = ps(&srv)[0].clone();
    let left = secs_until(m["expires_at"].as_str().unwrap());
    assert!(left <= 2.5, "{m}");
    wait_until("the keep-alive to run out", 60, || !loaded(&srv));
    // Seconds as a number, and negative = forever.
    let (status, _) = generate(&srv, json!({"keep_alive": -1}));
    assert_eq!(status, 200);
    let m = ps(&srv)[0].clone();
    assert!(
        secs_until(m["expires_at"].as_str().unwrap()) > 365.0 * 86400.0,
        "{m}"
    );
    // A keep_alive that is not a duration is a clear 400.
    let (status, v) = generate(&srv, json!({"keep_alive": "soon"}));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("duration"), "{v}");
}

#[test]
fn requests_sent_while_the_model_loads_wait_for_it() {
    let dir = small_only();
    let cfg = dir.path().join("models.toml");
    // Returns as soon as the server listens, while the model is still loading.
    let srv = server::start_listening(&["--config", cfg.to_str().unwrap()], &[]);
    let base = srv.base.clone();
    let was_loading = client()
        .get(format!("{base}/ready"))
        .send()
        .unwrap()
        .status()
        == 503;
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                let path = if i == 1 { "/api/chat" } else { "/api/generate" };
                let body = if i == 1 {
                    json!({"model": SMALL, "messages": [{"role": "user", "content": "Say hi."}], "stream": false, "options": {"num_predict": 3}})
                } else {
                    json!({"model": SMALL, "prompt": "def add(a, b):", "raw": true, "stream": false, "options": {"num_predict": 3}})
                };
                let r = client().post(format!("{base}{path}")).json(&body).send().unwrap();
                (r.status().as_u16(), r.text().unwrap())
            })
        })
        .collect();
    // The OpenAI route waits too.
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": SMALL, "prompt": "def add(a, b):", "max_tokens": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    for h in handles {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"eval_count\":3"), "{body}");
    }
    assert!(
        was_loading,
        "the server was ready before the test could ask during loading"
    );
}
