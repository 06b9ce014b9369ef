//! Bounded work per request, on a real `duet serve` with the 0.5B: a 4 MB prompt of one
//! word is cut before it is tokenized (the acceptance criterion: answered within
//! 5 s, while another client's request to the same model is not delayed by more than a
//! second); oversized requests are clear 400s; a generation without num_predict ends
//! (the server's default limit, the loop guard); slow clients (slowloris) and stalled
//! stream readers are dropped.

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::{client, Server};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn start(dir: &tempfile::TempDir, extra: &[&str]) -> Server {
    let cfg = dir.path().join("models.toml");
    server::start_with(&["--config", cfg.to_str().unwrap()], extra)
}

/// A word of `n` pseudo-random lowercase letters (no spaces: one pre-token for the BPE).
fn one_word(n: usize) -> String {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// Sends a small streamed request; seconds to its first token, and its last line.
fn small_request(base: &str) -> (f64, Value) {
    let start = Instant::now();
    let r = client()
        .post(format!("{base}/api/generate"))
        .json(&json!({"model": SMALL, "prompt": "Write a haiku about rust.", "options": {"num_predict": 4, "temperature": 0}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ttft = None;
    let mut last = Value::Null;
    for line in BufReader::new(r).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if ttft.is_none() && v["response"].as_str().is_some_and(|s| !s.is_empty()) {
            ttft = Some(start.elapsed().as_secs_f64());
        }
        last = v;
    }
    (ttft.unwrap_or(f64::NAN), last)
}

#[test]
fn a_4mb_single_word_is_cut_fast_and_does_not_hold_up_other_clients() {
    let dir = small_only();
    let srv = start(&dir, &[]);
    // The other client's time to first token with the model to itself (best of three).
    let alone = (0..3)
        .map(|_| small_request(&srv.base).0)
        .fold(f64::INFINITY, f64::min);

    let word = one_word(4 << 20);
    let base = srv.base.clone();
    let big = std::thread::spawn(move || {
        let start = Instant::now();
        let r = client()
            .post(format!("{base}/api/generate"))
            .json(&json!({"model": SMALL, "prompt": word, "options": {"num_predict": 2}}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        // The stream starts once the prompt is cut, rendered, tokenized and queued.
        let accepted = start.elapsed().as_secs_f64();
        let lines: Vec<Value> = BufReader::new(r)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect();
        (accepted, start.elapsed().as_secs_f64(), lines)
    });
    // The other client asks while the 4 MB prompt is being taken in.
    std::thread::sleep(Duration::from_millis(300));
    let (meanwhile, last) = small_request(&srv.base);
    assert_eq!(last["done"], true, "{last}");
    let (accepted, answered, lines) = big.join().unwrap();
    let done = lines.last().unwrap();
    eprintln!(
        "4 MB word: accepted after {accepted:.2} s, answered after {answered:.2} s \
         ({} prompt tokens); the other client's first token: {alone:.2} s alone, \
         {meanwhile:.2} s meanwhile",
        done["prompt_eval_count"]
    );
    assert_eq!(done["done"], true, "{done}");
    // Cut to num_ctx (4096 by default), not refused.
    let n = done["prompt_eval_count"].as_u64().unwrap();
    assert!((1000..4096).contains(&n), "{done}");
    // The bound: taken in (cut, rendered, tokenized, queued) within 5 s.
    assert!(
        accepted < 5.0,
        "the 4 MB prompt took {accepted:.2} s to be taken in"
    );
    // The other client is not held behind the long prompt: its first token comes while
    // the 4095 positions are still being read (in steps paced to about 0.4 s; it waits
    // for at most the step under way, then shares the next). Relative, so it holds on a
    // loaded machine; the absolute delay is printed above (RELIABILITY.md has the
    // measurements).
    assert!(
        meanwhile < answered / 10.0,
        "the other client waited {meanwhile:.2} s for its first token ({alone:.2} s alone), \
         the long prompt's answer took {answered:.2} s"
    );
}

#[test]
fn oversized_requests_are_clear_400s_in_each_apis_shape() {
    let dir = small_only();
    let srv = start(&dir, &[]);
    let user = json!({"role": "user", "content": "hi"});
    let tool =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"options": {"num_ctx": 1_000_000}}), "num_ctx"),
        (
            json!({"options": {"num_predict": 100_000_000}}),
            "num_predict",
        ),
        (json!({"options": {"stop": vec!["x"; 65]}}), "stop"),
        (json!({"options": {"stop": ["y".repeat(600)]}}), "stop"),
        (
            json!({"messages": vec![user.clone(); 5000]}),
            "too many messages",
        ),
        (json!({"tools": vec![tool; 129]}), "too many tools"),
        (
            json!({"format": {"type": "object", "description": "d".repeat(70_000)}}),
            "JSON schema",
        ),
    ];
    for (extra, word) in &cases {
        let mut body = json!({"model": SMALL, "messages": [user.clone()], "stream": false});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = srv.post("/api/chat", body);
        assert_eq!(status, 400, "{word}: {v}");
        assert!(v["error"].as_str().unwrap().contains(word), "{word}: {v}");
    }
    // The same caps through /v1, in OpenAI's error shape.
    let v1: Vec<(Value, &str)> = vec![
        (json!({"max_tokens": 100_000_000}), "num_predict"),
        (json!({"stop": vec!["x"; 65]}), "stop"),
        (
            json!({"messages": vec![user.clone(); 5000]}),
            "too many messages",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "description": "d".repeat(70_000)}}}}),
            "JSON schema",
        ),
    ];
    for (extra, word) in &v1 {
        let mut body = json!({"model": SMALL, "messages": [user.clone()]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = srv.post("/v1/chat/completions", body);
        assert_eq!(status, 400, "{word}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(word),
            "{word}: {v}"
        );
    }
    // Other requests no model could honour.
    for (body, word) in [
        (
            json!({"model": SMALL, "prompt": "hi", "context": [1, 999_999]}),
            "outside the vocabulary",
        ),
        (
            json!({"model": SMALL, "prompt": "hi", "template": "{{ .Prompt }}"}),
            "custom templates",
        ),
    ] {
        let (status, v) = srv.post("/api/generate", body);
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(word), "{v}");
    }
    let (status, v) = srv.post(
        "/v1/chat/completions",
        json!({"model": SMALL, "messages": [user.clone()], "n": 3}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("n = 1"),
        "{v}"
    );
    // Embedding requests: at most 2048 inputs.
    let many = vec!["x"; 2049];
    let (status, v) = srv.post("/api/embed", json!({"model": "all-minilm", "input": many}));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("too many inputs"),
        "{v}"
    );
    let (status, v) = srv.post(
        "/v1/embeddings",
        json!({"model": "all-minilm", "input": many}),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // Values within the caps are taken (num_ctx beyond the model is capped silently).
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "hi", "stream": false,
               "options": {"num_ctx": 131072, "num_predict": 2, "stop": vec!["zz"; 64]}}),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn generations_without_num_predict_end() {
    let dir = small_only();
    let srv = start(&dir, &["--default-num-predict", "12"]);
    // No num_predict: the server's default limit.
    let (status, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "Write a long essay about the sea.", "stream": false}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["eval_count"], 12, "{v}");
    assert_eq!(v["done_reason"], "length", "{v}");
    // A client's own num_predict still counts.
    let (_, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "Write a long essay about the sea.", "stream": false, "options": {"num_predict": 20}}),
    );
    assert_eq!(v["eval_count"], 20, "{v}");
    // An answer that degenerates into one word over and over ends as "length", long
    // before its num_predict, natively and through /v1.
    let ha = "ha ".repeat(300);
    let (_, v) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": ha, "raw": true, "stream": false,
               "options": {"num_predict": 2000, "temperature": 0}}),
    );
    assert_eq!(v["done_reason"], "length", "{v}");
    let n = v["eval_count"].as_u64().unwrap();
    assert!((256..1000).contains(&n), "{n} tokens: {v}");
    let (_, v) = srv.post(
        "/v1/chat/completions",
        json!({"model": SMALL, "max_tokens": 2000, "temperature": 0, "messages": [
            {"role": "user", "content": "Repeat the word ha forever, separated by spaces. Never stop."}]}),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() < 1000,
        "{v}"
    );
}

/// Seconds until the server closes `s` (reading whatever it sends), at most `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<(f64, String)> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => {
                return Some((
                    start.elapsed().as_secs_f64(),
                    String::from_utf8_lossy(&got).into_owned(),
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                return Some((
                    start.elapsed().as_secs_f64(),
                    String::from_utf8_lossy(&got).into_owned(),
                ))
            }
        }
    }
    None
}

#[test]
fn slow_senders_and_stalled_readers_are_dropped() {
    let dir = small_only();
    let srv = start(&dir, &["--client-timeout", "2"]);
    let addr = srv.base.trim_start_matches("http://").to_string();

    // Headers trickled a line every half second (slowloris): closed after the timeout.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let trickle = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for i in 0..40 {
                std::thread::sleep(Duration::from_millis(500));
                if w.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let closed = closed_within(&mut s, Duration::from_secs(15));
    assert!(
        closed.is_some(),
        "a connection trickling its headers was kept open"
    );
    trickle.join().unwrap();

    // A body that never finishes arriving: 408, in JSON.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(
        b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ",
    )
    .unwrap();
    let (secs, answer) = closed_within(&mut s, Duration::from_secs(15)).expect("closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    eprintln!("slow body refused after {secs:.1} s");

    // The server still answers.
    let (status, _) = srv.post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "hi", "stream": false, "options": {"num_predict": 1}}),
    );
    assert_eq!(status, 200);
}

#[test]
fn a_stream_nobody_reads_does_not_hold_its_batch_slot() {
    let dir = small_only();
    let srv = start(&dir, &["--client-timeout", "2"]);
    let addr = srv.base.trim_start_matches("http://").to_string();
    // A long answer (a grammar: at least 3000 integers, sampled so it never settles
    // into a loop), each token's line made large with 20 alternatives' log
    // probabilities, to a client that reads nothing: the socket's buffers fill, then
    // the server gives up on the client.
    let body = json!({"model": SMALL, "prompt": "List random integers as a JSON array.",
        "format": {"type": "array", "items": {"type": "integer"}, "minItems": 3000},
        "logprobs": true, "top_logprobs": 20,
        "options": {"num_predict": 6000, "temperature": 1.0, "seed": 7}})
    .to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    // A small receive buffer: the client's side holds little of what it never reads.
    let small: libc::c_int = 4096;
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    write!(
        s,
        "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let in_flight = || srv.metric("duet_in_flight_requests", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while in_flight() == 0.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    while in_flight() > 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "a stream nobody reads still holds its slot"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let decoded = srv.metric("duet_scheduled_tokens_total", &["phase=\"decode\""]);
    eprintln!(
        "unread stream dropped after {:.1} s, {decoded} tokens",
        start.elapsed().as_secs_f64()
    );
    // It ended long before the 3000 items (6000 tokens) the grammar demands.
    assert!(decoded < 5000.0, "{decoded} tokens decoded");
    assert!(srv.metric("duet_generations_total", &["outcome=\"cancelled\""]) >= 1.0);
    drop(s);
}
