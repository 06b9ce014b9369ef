//! The HTTP API of a real `duet serve` on the CPU layout (0.5B on cpu:0, 1.5B on cpu:1).

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::{client, Server};
use std::io::{BufRead, BufReader};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn srv() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| server::start(&["--layout", "cpu"]))
}

fn url(path: &str) -> String {
    format!("{}{path}", srv().base)
}

fn post(path: &str, body: Value) -> (u16, Value) {
    let r = client().post(url(path)).json(&body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn greedy_case(i: usize) -> (Vec<u32>, Vec<u32>, String) {
    let v = vectors("greedy-qwen2.5-coder-0.5b-instruct-q4_k_m.json");
    let c = &v["cases"][i];
    (
        ids(&c["prompt_ids"]),
        ids(&c["greedy_ids"]),
        c["prompt"].as_str().unwrap().to_string(),
    )
}

#[test]
fn root_version_and_readiness() {
    let r = client().get(url("/")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "Ollama is running");
    let r = client().head(url("/")).send().unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = client()
        .get(url("/api/version"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(v["version"].as_str().unwrap().contains('.'));
    let r = client().get(url("/ready")).send().unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn tags_show_and_ps_use_ollama_shapes() {
    let v: Value = client()
        .get(url("/api/tags"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let names: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    // The router is listed too, so clients that offer only listed models can pick it.
    assert_eq!(names, vec![SMALL, LARGE, "auto", EMBED]);
    assert_eq!(v["models"][2]["details"]["parameter_size"], "1.5B");
    let e = &v["models"][3];
    assert_eq!(e["details"]["family"], "bert");
    assert_eq!(e["details"]["parameter_size"], "23M");
    assert!(e["size"].as_u64().unwrap() > 90_000_000);
    // Every field strict clients (Zed) parse, on every entry.
    for m in v["models"].as_array().unwrap() {
        for key in ["name", "model", "modified_at", "size", "digest", "details"] {
            assert!(!m[key].is_null(), "{key} of {m}");
        }
        for key in [
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        ] {
            assert!(!m["details"][key].is_null(), "details.{key} of {m}");
        }
    }
    let m = &v["models"][0];
    assert_eq!(m["details"]["family"], "qwen2");
    assert_eq!(m["details"]["quantization_level"], "Q4_K_M");
    assert_eq!(m["size"], 491400064);
    assert_eq!(
        m["digest"],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    );

    let (status, v) = post("/api/show", json!({"model": LARGE}));
    assert_eq!(status, 200);
    assert_eq!(v["model_info"]["general.architecture"], "qwen2");
    assert_eq!(v["model_info"]["qwen2.block_count"], 28);
    assert!(v["template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(v["capabilities"][0], "completion");
    assert!(v["parameters"].as_str().unwrap().contains("<|im_end|>"));
    assert_eq!(v["details"]["parameter_size"], "1.5B");

    let v: Value = client().get(url("/api/ps")).send().unwrap().json().unwrap();
    let ps = v["models"].as_array().unwrap();
    assert_eq!(ps.len(), 3);
    for m in ps {
        assert_eq!(m["size_vram"], 0);
        assert!(m["expires_at"].as_str().unwrap().ends_with('Z'));
        assert!(m["context_length"].as_u64().unwrap() > 0);
    }
    assert_eq!(ps[0]["device"], "cpu:0");
    assert_eq!(ps[1]["device"], "cpu:1");
    assert_eq!(ps[2]["name"], EMBED);

    let (status, v) = post("/api/show", json!({"model": EMBED}));
    assert_eq!(status, 200);
    assert_eq!(v["capabilities"], json!(["embedding"]));
    assert_eq!(v["model_info"]["bert.embedding_length"], 384);
}

#[test]
fn errors_have_ollama_statuses_and_messages() {
    let (s, v) = post("/api/generate", json!({"model": "llama3", "prompt": "hi"}));
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (404, "model 'llama3' not found")
    );
    let (s, v) = post("/api/chat", json!({"messages": []}));
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (400, "model is required")
    );
    let r = client()
        .post(url("/api/generate"))
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert!(v["error"].as_str().unwrap().contains("invalid JSON"), "{v}");
    let (s, v) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "hi", "images": ["aGk="]}),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "hi", "format": "xml"}),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "hi", "options": {"temperature": "hot"}}),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(s, 404);
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
}

#[test]
fn form_content_type_bodies_are_json_and_unknown_options_ignored() {
    // What `curl -d` sends: application/x-www-form-urlencoded.
    let r = client()
        .post(url("/api/generate"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(json!({"model": SMALL, "prompt": "Say hi", "stream": false, "options": {"num_predict": 3, "temperature": 0, "mirostat_eta": 0.1}}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["eval_count"], 3);
    assert_eq!(v["done_reason"], "length");
}

#[test]
fn generate_raw_temperature_zero_matches_greedy_vectors_streamed_and_not() {
    let (_, want, prompt) = greedy_case(0);
    let body = json!({"model": SMALL, "prompt": prompt, "raw": true, "stream": false,
                      "options": {"temperature": 0, "num_predict": 16}});
    let (s, v) = post("/api/generate", body.clone());
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["done"], true);
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(v[k].as_u64().is_some(), "{k} missing in {v}");
    }
    let context = ids(&v["context"]);
    assert_eq!(&context[context.len() - 16..], &want[..16]);
    let full = v["response"].as_str().unwrap().to_string();

    // Streamed: NDJSON lines whose pieces add up to the same text, then a final object.
    let mut body = body;
    body["stream"] = json!(true);
    let r = client()
        .post(url("/api/generate"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = BufReader::new(r)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    assert_eq!(text, full);
    assert!(lines.len() > 2);
}

#[test]
fn chat_multi_turn_streamed_and_seeded() {
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Add type hints: def greet(name): return 'hi ' + name"},
        {"role": "assistant", "content": "def greet(name: str) -> str:\n    return 'hi ' + name"},
        {"role": "user", "content": "Now add a docstring."}
    ]);
    let body = json!({"model": SMALL, "messages": messages, "stream": false, "tools": [],
                      "options": {"seed": 123, "temperature": 0.9, "num_predict": 12}});
    let (s, a) = post("/api/chat", body.clone());
    assert_eq!(s, 200, "{a}");
    let (_, b) = post("/api/chat", body.clone());
    assert_eq!(a["message"]["content"], b["message"]["content"]);
    assert_eq!(a["message"]["role"], "assistant");
    assert_eq!(a["prompt_eval_count"], b["prompt_eval_count"]);

    let mut body = body;
    body.as_object_mut().unwrap().remove("stream"); // streaming is the default
    let r = client().post(url("/api/chat")).json(&body).send().unwrap();
    let lines: Vec<Value> = BufReader::new(r)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let text: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, a["message"]["content"].as_str().unwrap());
    assert_eq!(lines.last().unwrap()["done"], true);
}

fn routed(path: &str, body: Value) -> (reqwest::header::HeaderMap, Value) {
    let r = client().post(url(path)).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    (headers, r.json().unwrap())
}

#[test]
fn auto_routes_simple_to_the_fast_model_and_complex_to_the_quality_model() {
    let simple = "Write a docstring for: def add(a, b): return a + b";
    let complex = "Implement a thread-safe LRU cache in Rust with O(1) get and put, with tests.";
    let (h, v) = routed(
        "/api/generate",
        json!({"model": "auto", "prompt": simple, "stream": false, "options": {"num_predict": 2}}),
    );
    assert_eq!(h["x-duet-tier"], "SIMPLE");
    assert_eq!(h["x-duet-model"], SMALL);
    assert_eq!(h["x-duet-fallback"], "false");
    let confidence: f32 = h["x-duet-confidence"].to_str().unwrap().parse().unwrap();
    assert!(confidence > 0.5 && confidence <= 1.0);
    assert_eq!(v["model"], SMALL);

    let (h, v) = routed(
        "/api/chat",
        json!({"model": "auto", "stream": false, "options": {"num_predict": 2},
        "messages": [{"role": "user", "content": complex}]}),
    );
    assert_eq!(h["x-duet-tier"], "COMPLEX");
    assert_eq!(h["x-duet-model"], LARGE);
    assert_eq!(v["model"], LARGE);

    // The configured alias is routed too, and so is the OpenAI API.
    let (h, v) = routed(
        "/v1/chat/completions",
        json!({"model": "duet", "max_tokens": 2,
        "messages": [{"role": "user", "content": complex}]}),
    );
    assert_eq!(h["x-duet-model"], LARGE);
    assert_eq!(v["model"], LARGE);
    let (h, _) = routed(
        "/v1/completions",
        json!({"model": "auto", "max_tokens": 2, "prompt": simple}),
    );
    assert_eq!(h["x-duet-tier"], "SIMPLE");

    // A named model bypasses the classifier: no routing headers.
    let r = client().post(url("/api/generate")).json(&json!({"model": "qwen2.5-coder:1.5b-instruct", "prompt": simple, "stream": false, "options": {"num_predict": 1}})).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-duet-tier").is_none());
}

#[test]
fn openai_chat_completions_and_completions() {
    let (_, want, _) = greedy_case(2);
    let (s, v) = post(
        "/v1/chat/completions",
        json!({
        "model": SMALL, "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Implement a Python function is_prime(n)."}]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let small = small();
    assert_eq!(
        small
            .tokenize(v["choices"][0]["message"]["content"].as_str().unwrap())
            .unwrap(),
        want[..16]
    );

    let r = client().post(url("/v1/chat/completions")).json(&json!({
        "model": SMALL, "temperature": 0, "max_tokens": 8, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Say hello"}]})).send().unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events: Vec<String> = BufReader::new(r)
        .lines()
        .map(|l| l.unwrap())
        .filter(|l| l.starts_with("data: "))
        .collect();
    assert_eq!(events.last().unwrap(), "data: [DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2][6..]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 8);

    let (s, v) = post(
        "/v1/completions",
        json!({"model": SMALL, "prompt": "def add(a, b):", "max_tokens": 5, "stop": ["\n\n"]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let v: Value = client()
        .get(url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 4); // both models, auto, all-minilm
    let r = client()
        .get(url("/v1/models/qwen2.5-coder:0.5b"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client().get(url("/v1/models/missing")).send().unwrap();
    assert_eq!(r.status(), 404);
}

/// Reads a streamed generate and returns when each line arrived; `first` hears when the
/// first line is in.
fn timed_stream(model: &str, n: u32, first: Option<std::sync::mpsc::Sender<()>>) -> Vec<Instant> {
    let r = client()
        .post(url("/api/generate"))
        .json(&json!({"model": model, "prompt": "Write a long story about a robot.", "options": {"num_predict": n, "temperature": 0}}))
        .send()
        .unwrap();
    BufReader::new(r)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            l.unwrap();
            if i == 0 {
                if let Some(tx) = &first {
                    let _ = tx.send(());
                }
            }
            Instant::now()
        })
        .collect()
}

#[test]
fn both_models_generate_at_the_same_time() {
    srv();
    // The large model starts first and the small one once the large one is producing:
    // started together, the small one's 40 tokens could all be out before the large one
    // had finished reading its prompt.
    let (tx, rx) = std::sync::mpsc::channel();
    let b = std::thread::spawn(move || timed_stream(LARGE, 32, Some(tx)));
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the large model never started answering");
    let a = std::thread::spawn(|| timed_stream(SMALL, 40, None));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    // Tokens of each arrived while the other was still producing: the generations overlap.
    let start = (*a.first().unwrap()).max(*b.first().unwrap());
    let end = (*a.last().unwrap()).min(*b.last().unwrap());
    assert!(start < end, "generations did not overlap");
    let a_inside = a.iter().filter(|t| **t > start && **t < end).count();
    let b_inside = b.iter().filter(|t| **t > start && **t < end).count();
    assert!(
        a_inside >= 2 && b_inside >= 2,
        "a {a_inside}, b {b_inside} tokens in the overlap"
    );
}

fn scrape() -> prometheus_parse::Scrape {
    let r = client().get(url("/metrics")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let body = r.text().unwrap();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format")
}

/// Sum of a counter's (or a histogram's count's) samples whose labels include `labels`.
fn total(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or(0.0),
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_parse_and_move_after_routed_requests() {
    let before = scrape();
    let simple = "Write a docstring for: def add(a, b): return a + b";
    routed(
        "/api/generate",
        json!({"model": "auto", "prompt": simple, "stream": false, "options": {"num_predict": 3}}),
    );
    routed(
        "/api/chat",
        json!({"model": "auto", "stream": false, "options": {"num_predict": 3},
        "messages": [{"role": "user", "content": "Implement a B-tree in Rust."}]}),
    );
    let after = scrape();
    let grew = |metric: &str, labels: &[(&str, &str)], by: f64| {
        let (b, a) = (
            total(&before, metric, labels),
            total(&after, metric, labels),
        );
        assert!(a >= b + by, "{metric} {labels:?}: {b} -> {a}");
    };
    grew(
        "duet_requests_total",
        &[
            ("model", SMALL),
            ("tier", "SIMPLE"),
            ("device", "cpu:0"),
            ("endpoint", "/api/generate"),
            ("status", "200"),
        ],
        1.0,
    );
    grew(
        "duet_requests_total",
        &[
            ("model", LARGE),
            ("tier", "COMPLEX"),
            ("endpoint", "/api/chat"),
        ],
        1.0,
    );
    grew(
        "duet_routing_decisions_total",
        &[("tier", "SIMPLE"), ("fallback", "false")],
        1.0,
    );
    grew("duet_routing_decisions_total", &[("tier", "COMPLEX")], 1.0);
    grew("duet_generated_tokens_total", &[("model", SMALL)], 3.0);
    grew("duet_prompt_tokens_total", &[("model", LARGE)], 5.0);
    for h in [
        "duet_time_to_first_token_seconds_count",
        "duet_request_duration_seconds_count",
        "duet_time_per_output_token_seconds_count",
        "duet_queue_wait_seconds_count",
    ] {
        grew(h, &[("model", SMALL)], 1.0);
    }
    // The SIMPLE request ran on the 0.5B instead of the 1.5B: its time-saved estimate was
    // recorded (the arithmetic itself is unit-tested in metrics.rs; its value depends on
    // the load other tests put on the machine).
    assert!(
        after
            .samples
            .iter()
            .any(|x| x.metric == "duet_routing_time_saved_seconds_total"
                && x.labels.get("model") == Some(SMALL)),
        "no time-saved sample for {SMALL}"
    );
    assert_eq!(
        total(
            &after,
            "duet_model_loaded",
            &[("model", LARGE), ("device", "cpu:1")]
        ),
        1.0
    );
    assert!(
        total(
            &after,
            "duet_model_tokens_per_second",
            &[("model", SMALL), ("phase", "eval")]
        ) > 0.0
    );
    for g in ["duet_queue_depth", "duet_in_flight_requests"] {
        assert!(after.samples.iter().any(|x| x.metric == g), "{g} missing");
    }
}
