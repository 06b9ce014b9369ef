//! Server limits on single-model servers: the bounded queue, client disconnects, the
//! request body and num_predict caps, CORS, and graceful shutdown.

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::{client, Server};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

fn start(dir: &tempfile::TempDir, extra: &[&str]) -> Server {
    let cfg = dir.path().join("models.toml");
    server::start_with(&["--config", cfg.to_str().unwrap()], extra)
}

/// The server's /ready answer.
fn ready(srv: &Server) -> Value {
    client()
        .get(format!("{}/ready", srv.base))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn slot(srv: &Server) -> Value {
    ready(srv)["models"][0].clone()
}

fn wait_for(srv: &Server, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pred(&slot(srv)) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            slot(srv)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn long_stream(srv: &Server) -> BufReader<reqwest::blocking::Response> {
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&json!({"model": SMALL, "prompt": "Count from 1 to 10000.", "options": {"num_predict": 5000}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut lines = BufReader::new(r);
    let mut first = String::new();
    lines.read_line(&mut first).unwrap(); // the generation is running
    lines
}

#[test]
fn full_queue_is_503_and_a_disconnect_frees_the_worker() {
    let dir = small_only();
    // One request runs at a time, so the next one waits in the bounded queue.
    let srv = start(&dir, &["--max-queue", "1", "--parallel", "1"]);
    let running = long_stream(&srv);
    wait_for(&srv, "the long request to start", |m| m["in_flight"] == 1);
    // One more request may wait in the queue...
    let base = srv.base.clone();
    let queued = std::thread::spawn(move || {
        let r = client()
            .post(format!("{base}/api/generate"))
            .json(&json!({"model": SMALL, "prompt": "hi", "stream": false, "options": {"num_predict": 1}}))
            .send()
            .unwrap();
        r.status().as_u16()
    });
    wait_for(&srv, "the second request to queue", |m| m["queued"] == 1);
    // ...the next one is refused with Ollama's message.
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&json!({"model": SMALL, "prompt": "hi", "stream": false}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["error"],
        "server busy, please try again.  maximum pending requests exceeded"
    );
    // The client of the 5000-token generation goes away: the worker stops it and takes
    // the queued request, long before 5000 tokens could have been generated.
    drop(running);
    assert_eq!(queued.join().unwrap(), 200);
    wait_for(&srv, "the worker to be idle", |m| {
        m["in_flight"] == 0 && m["queued"] == 0
    });
}

#[test]
fn body_size_and_num_predict_caps_and_cors() {
    let dir = small_only();
    let srv = start(&dir, &["--max-body", "2048", "--max-predict", "3"]);
    let big = json!({"model": SMALL, "prompt": "x".repeat(4096)});
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&big)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&json!({"model": SMALL, "prompt": "Write a poem.", "stream": false, "options": {"num_predict": 100}}))
        .send()
        .unwrap();
    let v: Value = r.json().unwrap();
    assert_eq!(v["eval_count"], 3, "{v}");
    assert_eq!(v["done_reason"], "length");

    let preflight = |origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, format!("{}/api/chat", srv.base))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
            .unwrap()
    };
    let ok = preflight("http://localhost:3000");
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let evil = preflight("https://evil.example");
    assert!(evil.headers().get("access-control-allow-origin").is_none());
}

/// DNS rebinding: a foreign Host is refused; the API key (here from DUET_API_KEY) guards
/// every route but / and /api/version; errors no handler wrote are JSON in each API's
/// shape (404, 405, 413, 401, 403).
#[test]
fn foreign_hosts_api_keys_and_json_errors() {
    let dir = small_only();
    let cfg = dir.path().join("models.toml");
    let srv = server::start_env(
        &["--config", cfg.to_str().unwrap()],
        &["--max-body", "2048"],
        &[("DUET_API_KEY", "s3cret-key")],
    );
    let get = |path: &str, host: Option<&str>, key: Option<&str>| {
        let mut r = client().get(format!("{}{path}", srv.base));
        if let Some(h) = host {
            r = r.header("Host", h);
        }
        if let Some(k) = key {
            r = r.header("Authorization", format!("Bearer {k}"));
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        )
    };
    let key = Some("s3cret-key");
    // The open routes answer without the key, as clients probe them.
    assert_eq!(get("/api/version", None, None).0, 200);
    assert_eq!(get("/", None, None).0, 200);
    // Everything else needs it, in each API's error shape.
    let (s, v) = get("/api/tags", None, None);
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("API key"), "{v}");
    let (s, v) = get("/v1/models", None, Some("wrong"));
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["message"], "invalid API key", "{v}");
    let (s, v) = get("/api/tags", None, key);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["models"][0]["name"], SMALL, "{v}");
    assert_eq!(get("/v1/models", None, key).0, 200);
    // Host: a page on evil.example.com rebound to 127.0.0.1 is refused, key or not.
    let (s, v) = get("/api/tags", Some("evil.example.com:11434"), key);
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("localhost"), "{v}");
    let (s, v) = get("/api/version", Some("evil.example.com"), None);
    assert_eq!(s, 403, "{v}");
    for local in [
        "localhost:11434",
        "127.0.0.1",
        "app.localhost",
        "[::1]:8080",
    ] {
        assert_eq!(get("/api/version", Some(local), None).0, 200, "{local}");
    }
    // Unknown paths and wrong methods: JSON, Ollama's shape or OpenAI's.
    let (s, v) = get("/api/nope", None, key);
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("/api/nope"), "{v}");
    let (s, v) = get("/v1/nope", None, key);
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");
    let (s, v) = get("/api/chat", None, key);
    assert_eq!(s, 405, "{v}");
    assert!(v["error"].as_str().unwrap().contains("GET"), "{v}");
    // A body over --max-body: 413 in JSON.
    let r = client()
        .post(format!("{}/v1/chat/completions", srv.base))
        .header("Authorization", "Bearer s3cret-key")
        .json(&json!({"model": SMALL, "messages": [{"role": "user", "content": "x".repeat(4096)}]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
}

#[test]
fn sigterm_drains_in_flight_requests_refuses_new_ones_then_exits() {
    let dir = small_only();
    let srv = start(&dir, &[]);
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        // A prompt whose answer runs far past 64 tokens. ("Count to 20." was a near tie
        // between "Sure" and "2" (0.03 logits) for the 0.5B, and "20" ends the answer.)
        .json(&json!({"model": SMALL, "prompt": "Write a Python function to reverse a string.", "options": {"num_predict": 64, "temperature": 0}}))
        .send()
        .unwrap();
    let mut lines = BufReader::new(r).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["done"], false);
    unsafe {
        libc::kill(srv.pid as i32, libc::SIGTERM);
    }
    // While it drains, a new request is refused with 503 in its API's shape.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, v) = loop {
        let (status, v) = srv.post(
            "/api/generate",
            json!({"model": SMALL, "prompt": "hi", "stream": false, "options": {"num_predict": 1}}),
        );
        if status == 503 || Instant::now() > deadline {
            break (status, v);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("shutting down"),
        "{v}"
    );
    let (status, v) = srv.post("/v1/completions", json!({"model": SMALL, "prompt": "hi"}));
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["type"], "server_busy_error", "{v}");
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(
        rest.last().unwrap()["done"],
        true,
        "the in-flight answer was cut"
    );
    assert_eq!(rest.last().unwrap()["eval_count"], 64);
    assert_eq!(rest.last().unwrap()["done_reason"], "length");
    // New connections are refused once it has stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client().get(format!("{}/", srv.base)).send().is_ok() {
        assert!(
            Instant::now() < deadline,
            "server still answering after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn complex_requests_fall_back_when_the_quality_model_is_unavailable() {
    // The layout places the 1.5B, but its weights are missing: it cannot load.
    let (_dir, srv) = server::start_pair("/nonexistent/large.gguf".as_ref(), "cpu:1");
    server::assert_complex_falls_back(&srv);
    // Naming the missing model is a clear 404, not a hang.
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&json!({"model": LARGE, "prompt": "hi"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn a_model_on_a_missing_gpu_is_unavailable_and_the_router_falls_back() {
    // The 1.5B is placed on cuda:1, which this machine (or this build) does not have.
    let large = weights(LARGE);
    let (_dir, srv) = server::start_pair(&large, "cuda:1");
    // Ready once the 0.5B is warm and the 1.5B has failed; /ready says which and why.
    let ready = ready(&srv);
    let failed = ready["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == LARGE)
        .unwrap();
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["device"], "cuda:1");
    server::assert_complex_falls_back(&srv);
    // Asking for the model by name says why it cannot answer.
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&json!({"model": LARGE, "prompt": "hi", "stream": false}))
        .send()
        .unwrap();
    assert!(r.status().is_client_error() || r.status().is_server_error());
    let body = r.text().unwrap();
    assert!(body.contains("cuda:1"), "{body}");
}
