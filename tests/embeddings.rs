//! The embedding model against an independent implementation's vectors (float64 BERT,
//! mean pooling over the real tokens, L2 normalisation), and over HTTP: /api/embed,
//! /api/embeddings and /v1/embeddings of a real `duet serve`.

mod common;

use common::*;
use duet::model::embed::Embedder;

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn embeddings_match_the_reference_vectors() {
    let e = Embedder::load(&embedding_dir(), &candle_core::Device::Cpu).unwrap();
    let v = vectors("embeddings-all-minilm-l6-v2.json");
    let cases = v["cases"].as_array().unwrap();
    let inputs: Vec<String> = cases
        .iter()
        .map(|c| c["input"].as_str().unwrap().to_string())
        .collect();
    let tokens = e.tokenize(&inputs, true).unwrap();
    let got = e.embed(&inputs, true).unwrap();
    assert_eq!(got.vectors.len(), cases.len());
    for ((case, ids), vec) in cases.iter().zip(&tokens).zip(&got.vectors) {
        assert_eq!(ids, &ids_of(&case["token_ids"]), "{}", case["input"]);
        let want: Vec<f64> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(vec.len(), 384);
        let c = cosine(vec, &want);
        assert!(c >= 0.999, "{}: cosine {c}", case["input"]);
        let norm: f32 = vec.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // One at a time gives the same vectors as the padded batch.
    for (input, batched) in inputs.iter().zip(&got.vectors) {
        let alone = e.embed(std::slice::from_ref(input), true).unwrap();
        let c = cosine(
            &alone.vectors[0],
            &batched.iter().map(|x| *x as f64).collect::<Vec<_>>(),
        );
        assert!(c > 0.99999, "{input}: {c}");
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    ids(v)
}

#[path = "common/server.rs"]
mod server;

use serde_json::{json, Value};
use std::sync::OnceLock;

fn srv() -> &'static server::Server {
    static S: OnceLock<server::Server> = OnceLock::new();
    S.get_or_init(|| server::start(&["--layout", "cpu"]))
}

fn post(path: &str, body: Value) -> (u16, Value) {
    srv().post(path, body)
}

fn reference() -> Vec<(String, Vec<f64>)> {
    vectors("embeddings-all-minilm-l6-v2.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let v = c["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (c["input"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn api_embed_batches_inputs_and_matches_the_reference() {
    let cases = reference();
    let inputs: Vec<&str> = cases.iter().map(|(i, _)| i.as_str()).collect();
    let (s, v) = post("/api/embed", json!({"model": EMBED, "input": inputs}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"], EMBED);
    let got = v["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), cases.len());
    for ((input, want), g) in cases.iter().zip(got) {
        let c = cosine(&floats(g), want);
        assert!(c >= 0.999, "{input}: {c}");
    }
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 50);
    assert!(v["total_duration"].as_u64().unwrap() > 0);
    // A string, an alias, `:latest`, and dimensions (cut and normalised again).
    let (s, v) = post(
        "/api/embed",
        json!({"model": "all-minilm:latest", "input": inputs[0], "dimensions": 64}),
    );
    assert_eq!(s, 200, "{v}");
    let one = floats(&v["embeddings"][0]);
    assert_eq!(one.len(), 64);
    assert!((one.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    let (s, _) = post(
        "/api/embed",
        json!({"model": "all-minilm:l6-v2", "input": inputs[0]}),
    );
    assert_eq!(s, 200);
}

#[test]
fn truncation_is_on_by_default_and_an_error_when_off() {
    let long = "token ".repeat(600);
    let (s, v) = post("/api/embed", json!({"model": EMBED, "input": long}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["prompt_eval_count"], 256);
    let (s, v) = post(
        "/api/embed",
        json!({"model": EMBED, "input": long, "truncate": false}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("truncate"), "{v}");
}

#[test]
fn legacy_and_openai_routes_and_their_errors() {
    let cases = reference();
    let (input, want) = &cases[2];
    let (s, v) = post("/api/embeddings", json!({"model": EMBED, "prompt": input}));
    assert_eq!(s, 200, "{v}");
    let legacy = floats(&v["embedding"]);
    assert!(cosine(&legacy, want) >= 0.999);

    let (s, v) = post(
        "/v1/embeddings",
        json!({"model": EMBED, "input": [input, cases[0].0]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][1]["index"], 1);
    assert!(cosine(&floats(&v["data"][0]["embedding"]), want) >= 0.999);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // base64: little-endian f32s.
    let (s, b) = post(
        "/v1/embeddings",
        json!({"model": EMBED, "input": input, "encoding_format": "base64"}),
    );
    assert_eq!(s, 200, "{b}");
    let text = b["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(text.len(), (384 * 4usize).div_ceil(3) * 4);
    // Token ids of the model's vocabulary.
    let ids = &vectors("embeddings-all-minilm-l6-v2.json")["cases"][2]["token_ids"];
    let (s, t) = post("/v1/embeddings", json!({"model": EMBED, "input": ids}));
    assert_eq!(s, 200, "{t}");
    assert!(cosine(&floats(&t["data"][0]["embedding"]), want) >= 0.999);

    for (path, body, status) in [
        ("/api/embed", json!({"model": LARGE, "input": "hi"}), 400),
        (
            "/api/embed",
            json!({"model": "nomic-embed-text", "input": "hi"}),
            404,
        ),
        ("/api/embed", json!({"input": "hi"}), 400),
        ("/api/embed", json!({"model": EMBED, "input": [1, 2]}), 400),
        (
            "/api/embed",
            json!({"model": EMBED, "input": "hi", "dimensions": 1000}),
            400,
        ),
        (
            "/v1/embeddings",
            json!({"model": EMBED, "input": "hi", "encoding_format": "int8"}),
            400,
        ),
        (
            "/v1/embeddings",
            json!({"model": EMBED, "input": [[99999999]]}),
            400,
        ),
    ] {
        let (s, v) = post(path, body.clone());
        assert_eq!(s, status, "{body} -> {v}");
    }
}
