//! Faults a server left running meets, on a real `duet serve`: a panic inside a request
//! (injected with DUET_INJECT_FAULT, the test hook) fails that request only; a panic in
//! the worker's loop restarts it and its queue still runs, and a worker that keeps
//! panicking fails its models instead of looping; a model file corrupted,
//! replaced or cut short while served makes that model unavailable with the reason, the
//! router falls back, and the server stays up (and takes the model back once its file
//! is good again).

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::{client, Server};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

fn ready(srv: &Server) -> Value {
    client()
        .get(format!("{}/ready", srv.base))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn model_state(srv: &Server, name: &str) -> Value {
    ready(srv)["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap()
}

fn stream(srv: &Server, model: &str, prompt: &str, n: u32) -> reqwest::blocking::Response {
    let r = client()
        .post(format!("{}/api/generate", srv.base))
        .json(&json!({"model": model, "prompt": prompt, "options": {"num_predict": n, "temperature": 0}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

fn gauges_settle(srv: &Server) {
    wait_until("the queue and in-flight gauges to return to 0", 60, || {
        srv.metric("duet_in_flight_requests", &[]) == 0.0
            && srv.metric("duet_queue_depth", &[]) == 0.0
    });
}

#[test]
fn a_panic_fails_only_its_request_and_a_panicking_worker_restarts() {
    let dir = small_only();
    let cfg = dir.path().join("models.toml");
    let srv = server::start_env(
        &["--config", cfg.to_str().unwrap()],
        &["--parallel", "2"],
        &[(
            "DUET_INJECT_FAULT",
            "request-panic:POISON-7f3a,worker-panic:CRASH-91be",
        )],
    );
    // A request that runs in the same batch as the one that panics.
    let neighbour = stream(
        &srv,
        SMALL,
        "Write a Python function that reverses a string.",
        40,
    );
    let mut neighbour = BufReader::new(neighbour).lines();
    let first: Value = serde_json::from_str(&neighbour.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["done"], false);
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "POISON-7f3a", "stream": false, "options": {"num_predict": 8}}),
    );
    assert_eq!(status, 500, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("internal error"),
        "{v}"
    );
    // The neighbour finished its whole answer.
    let rest: Vec<Value> = neighbour
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let last = rest.last().unwrap();
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["eval_count"], 40, "{last}");
    assert_eq!(srv.metric("duet_panics_total", &["where=\"request\""]), 1.0);

    // A panic in the worker's loop: the request that caused it fails, the worker
    // restarts, and the next request is answered.
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "CRASH-91be", "stream": false, "options": {"num_predict": 8}}),
    );
    assert_eq!(status, 500, "{v}");
    wait_until("the restart to be counted", 30, || {
        srv.metric("duet_worker_restarts_total", &["device=\"cpu:0\""]) == 1.0
    });
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "Say hi.", "stream": false, "options": {"num_predict": 4}}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done"], true);
    // /v1 reports a request panic in its own error shape.
    let (status, v) = srv.post(
        "/v1/chat/completions",
        json!({"model": SMALL, "messages": [{"role": "user", "content": "POISON-7f3a"}], "max_tokens": 4}),
    );
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    assert_eq!(model_state(&srv, SMALL)["state"], "ready");
    gauges_settle(&srv);

    // A worker that keeps panicking is given up on: after five restarts within a
    // minute its model is failed with the reason, and requests get it at once. (Six
    // more, so the sixth in a minute comes however long the steps above took.)
    for _ in 0..6 {
        let (status, v) = srv.post(
            "/api/generate",
            json!({"model": SMALL, "prompt": "CRASH-91be", "stream": false, "options": {"num_predict": 1}}),
        );
        assert!(status == 500 || status == 503, "{status} {v}");
    }
    wait_until("the model to be failed", 30, || {
        model_state(&srv, SMALL)["state"] == "failed"
    });
    let why = model_state(&srv, SMALL)["error"].to_string();
    assert!(why.contains("times within a minute"), "{why}");
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "Say hi.", "stream": false}),
    );
    assert_eq!(status, 503, "{v}");
    gauges_settle(&srv);
}

/// LARGE answers a short request by name.
fn large_answers(srv: &Server) {
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": LARGE, "prompt": "Say hi.", "stream": false, "options": {"num_predict": 2}}),
    );
    assert_eq!(status, 200, "{v}");
}

fn failed_with(srv: &Server, words: &[&str]) -> bool {
    let m = model_state(srv, LARGE);
    m["state"] == "failed"
        && words
            .iter()
            .all(|w| m["error"].as_str().unwrap_or_default().contains(w))
}

/// Copies the 0.5B's file to `blobs/<its sha256>` under `dir`, as the hf-hub cache names
/// a blob, so a change to its bytes is caught by the hash.
fn blob_copy(dir: &Path) -> PathBuf {
    let src = weights(SMALL);
    let sha = std::fs::canonicalize(&src)
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(sha.len(), 64, "the 0.5B comes from the hf-hub cache");
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let copy = blobs.join(&sha);
    std::fs::copy(&src, &copy).unwrap();
    copy
}

#[test]
fn a_model_file_corrupted_or_cut_short_while_served_fails_that_model_only() {
    let files = tempfile::tempdir().unwrap();
    let large = blob_copy(files.path());
    let (_dir, srv) = server::start_pair(&large, "cpu:1");
    large_answers(&srv);

    // Corrupt in place: bytes in the middle of the tensor data change, the size does
    // not. The header still reads; the blob no longer matches its name's sha256.
    let at = std::fs::metadata(&large).unwrap().len() / 2;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&large)
        .unwrap();
    let mut original = vec![0u8; 4096];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut original).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&vec![0x5a; 4096]).unwrap();
    f.sync_all().unwrap();
    wait_until("the corrupt file to be noticed", 60, || {
        failed_with(&srv, &["sha256", "corrupt"])
    });
    server::assert_complex_falls_back(&srv);
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": LARGE, "prompt": "hi", "stream": false}),
    );
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("sha256"), "{v}");

    // The bytes put back: the model is taken back and answers again.
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&original).unwrap();
    f.sync_all().unwrap();
    drop(f);
    wait_until("the repaired file to be taken back", 60, || {
        model_state(&srv, LARGE)["state"] != "failed"
    });
    large_answers(&srv);

    // Cut short while a request streams from it: that request ends with the reason, the
    // model is failed, the router falls back and the server goes on.
    let running = stream(
        &srv,
        LARGE,
        "Write a long story about a lighthouse keeper.",
        400,
    );
    let mut running = BufReader::new(running).lines();
    let first: Value = serde_json::from_str(&running.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["done"], false);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&large)
        .unwrap()
        .set_len(at)
        .unwrap();
    let rest: Vec<Value> = running
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let last = rest.last().unwrap();
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("cut short") || e.contains("cannot be used")),
        "{last}"
    );
    wait_until("the model to be failed", 30, || {
        model_state(&srv, LARGE)["state"] == "failed"
    });
    server::assert_complex_falls_back(&srv);
    assert_eq!(model_state(&srv, SMALL)["state"], "ready");
    gauges_settle(&srv);
}

#[test]
fn a_model_file_replaced_by_junk_is_unavailable_until_a_good_one_returns() {
    // LARGE is a hard link to the real file: replacing the link's name never touches
    // the real file's inode.
    let files = tempfile::tempdir().unwrap();
    let large = files.path().join("large.gguf");
    let real = std::fs::canonicalize(weights(SMALL)).unwrap();
    std::fs::hard_link(&real, &large).unwrap();
    let (_dir, srv) = server::start_pair(&large, "cpu:1");
    large_answers(&srv);

    let junk = files.path().join("junk.tmp");
    std::fs::write(
        &junk,
        b"GGUF but not really: a download cut off at the start",
    )
    .unwrap();
    std::fs::rename(&junk, &large).unwrap();
    wait_until("the junk to be noticed", 30, || {
        failed_with(&srv, &["cannot be used"])
    });
    server::assert_complex_falls_back(&srv);
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": LARGE, "prompt": "hi", "stream": false}),
    );
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains(LARGE), "{v}");

    // A good file moved into place: the model loads from it at its next request.
    let good = files.path().join("good.tmp");
    std::fs::hard_link(&real, &good).unwrap();
    std::fs::rename(&good, &large).unwrap();
    wait_until("the good file to be taken back", 30, || {
        model_state(&srv, LARGE)["state"] != "failed"
    });
    large_answers(&srv);
    assert_eq!(model_state(&srv, LARGE)["state"], "ready");
    gauges_settle(&srv);
}
