//! Request bodies of every route, through the real HTTP router (body parsing, option
//! checks, formats, tools, keep-alive, routing, the chat template, tokenization, the
//! sampler with whatever options the body sets, the response writers) in process, on a
//! model with the real vocabulary and chat template but one tiny generated layer (so a
//! request that gets through is answered in milliseconds). Every answer must be a
//! complete response: errors as JSON in their API's shape, never a 500 for a bad body,
//! streams of JSON lines or server-sent JSON events.
//!
//! Input: the first byte picks the route; the rest is the body (for GET routes with a
//! path parameter, the parameter).
#![no_main]

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use duet::api::{self, AppState, Limits};
use duet::config::{Config, DeviceSpec};
use duet::keep_alive::KeepAlive;
use duet::model::gguf::GgufValue;
use duet::model::synthetic::{SyntheticWeights, TensorSpec};
use duet::model::weights::WeightSource;
use duet::model::GgufFile;
use duet::serving::worker::{self, Capacity, Lifecycle, Placement, SlotFile};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceExt;

/// The name the tiny model is served under: the real 0.5B's, so that request bodies
/// taken from the tests find it.
const NAME: &str = "qwen2.5-coder:0.5b";
const HIDDEN: usize = 64;
const FFN: usize = 128;

/// A Qwen2 GGUF of one layer, `HIDDEN` wide, over the real vocabulary (its tokenizer
/// written beside it as tokenizer.json, which duet prefers to the GGUF's), with the real
/// 0.5B model's chat template.
fn write_tiny_model(dir: &Path) -> std::path::PathBuf {
    use candle_core::quantized::{gguf_file, GgmlDType};
    let codec = duet_fuzz::codec();
    codec
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .expect("write tokenizer.json");
    let real = duet_fuzz::small_gguf();
    let info = real.info().expect("the real model's metadata");
    let vocab = info.vocab_size;
    let t = |name: &str, dims: &[usize], dtype| TensorSpec {
        name: name.into(),
        dims: dims.to_vec(),
        dtype,
    };
    let (f32, q8) = (GgmlDType::F32, GgmlDType::Q8_0);
    let specs = vec![
        t("token_embd.weight", &[vocab, HIDDEN], q8),
        t("output_norm.weight", &[HIDDEN], f32),
        t("blk.0.attn_norm.weight", &[HIDDEN], f32),
        t("blk.0.attn_q.weight", &[HIDDEN, HIDDEN], q8),
        t("blk.0.attn_q.bias", &[HIDDEN], f32),
        t("blk.0.attn_k.weight", &[HIDDEN, HIDDEN], q8),
        t("blk.0.attn_k.bias", &[HIDDEN], f32),
        t("blk.0.attn_v.weight", &[HIDDEN, HIDDEN], q8),
        t("blk.0.attn_v.bias", &[HIDDEN], f32),
        t("blk.0.attn_output.weight", &[HIDDEN, HIDDEN], q8),
        t("blk.0.ffn_norm.weight", &[HIDDEN], f32),
        t("blk.0.ffn_gate.weight", &[FFN, HIDDEN], q8),
        t("blk.0.ffn_up.weight", &[FFN, HIDDEN], q8),
        t("blk.0.ffn_down.weight", &[HIDDEN, FFN], q8),
    ];
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let src = SyntheticWeights::of(specs, 7);
    let cpu = candle_core::Device::Cpu;
    let tensors: Vec<_> = names
        .iter()
        .map(|n| src.tensor(n, &cpu).expect("a generated tensor"))
        .collect();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    let metadata = vec![
        ("general.architecture", GgufValue::String("qwen2".into())),
        ("general.name", GgufValue::String("fuzz tiny".into())),
        ("general.file_type", GgufValue::U32(7)),
        ("qwen2.context_length", u32v(info.context_length)),
        ("qwen2.embedding_length", u32v(HIDDEN)),
        ("qwen2.block_count", u32v(1)),
        ("qwen2.feed_forward_length", u32v(FFN)),
        ("qwen2.attention.head_count", u32v(1)),
        ("qwen2.attention.head_count_kv", u32v(1)),
        ("qwen2.rope.freq_base", GgufValue::F32(info.rope_freq_base)),
        (
            "qwen2.attention.layer_norm_rms_epsilon",
            GgufValue::F32(info.rms_norm_eps as f32),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            u32v(info.eos_token_id.unwrap_or(151645) as usize),
        ),
        (
            "tokenizer.chat_template",
            GgufValue::String(info.chat_template.clone().unwrap_or_default()),
        ),
    ];
    let path = dir.join("tiny.gguf");
    let mut out = std::fs::File::create(&path).expect("create tiny.gguf");
    let md: Vec<(&str, &GgufValue)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        names.iter().map(|n| n.as_str()).zip(&tensors).collect();
    gguf_file::write(&mut out, &md, &ts).expect("write tiny.gguf");
    path
}

struct Server {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        // Copies made by /api/copy go here, not to the user's data folder.
        std::env::set_var("DUET_DATA_DIR", dir.path());
        let path = write_tiny_model(dir.path());
        let toml = format!(
            "[models.\"{NAME}\"]\npath = \"{}\"\naliases = [\"{NAME}-instruct\"]\n\
             [[layouts.cpu.place]]\nmodel = \"{NAME}\"\ndevice = \"cpu:0\"\n\
             tiers = [\"simple\", \"moderate\", \"complex\"]\n",
            path.display()
        );
        let config = Config::parse(&toml, "fuzz models.toml", dir.path().to_path_buf())
            .expect("the fuzz models.toml");
        let info = GgufFile::open(&path)
            .and_then(|g| g.info())
            .expect("the tiny model opens");
        let slots = worker::spawn(
            DeviceSpec::Cpu(0),
            vec![Placement {
                name: NAME.into(),
                file: Ok(SlotFile::new(path, info)),
                kv_cache_bytes: Some(8 << 20),
            }],
            Capacity {
                max_queue: 4,
                parallel: 2,
                stall_timeout: worker::DEFAULT_STALL_TIMEOUT,
            },
            Lifecycle {
                preload: true,
                keep_alive: KeepAlive::FOREVER,
            },
        );
        while slots.iter().any(|s| s.is_loading()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(e) = slots[0].failure() {
            panic!("the tiny model did not load: {e}");
        }
        let classifier =
            duet::router::Classifier::new(config.routing.clone()).expect("the routing rules");
        let chains = [
            duet::config::Tier::Simple,
            duet::config::Tier::Moderate,
            duet::config::Tier::Complex,
        ]
        .into_iter()
        .map(|t| (t, vec![NAME.to_string()]))
        .collect();
        let state = Arc::new(AppState {
            slots,
            embedders: Vec::new(),
            routed_names: vec!["auto".into()],
            classifier,
            // Decisions are not logged: nothing to write to disk per input.
            routing_log: None,
            chains,
            aliases: vec![(format!("{NAME}-instruct"), NAME.to_string())],
            limits: Limits {
                max_body: 1 << 20,
                // A few tokens are enough to take every answer through the writers.
                max_predict: Some(3),
                ..Limits::default()
            },
            keep_alive: KeepAlive::FOREVER,
            config,
            copies: api::models::Copies::load(),
            metrics: Arc::new(duet::metrics::Metrics::new().expect("metrics")),
        });
        let access = api::guard::Access {
            listen: "127.0.0.1:11434".parse().expect("an address"),
            api_key: None,
            drain: Default::default(),
        };
        let app = api::router(state, None, access);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        Server { rt, app, _dir: dir }
    })
}

const ROUTES: &[(Method, &str)] = &[
    (Method::POST, "/api/generate"),
    (Method::POST, "/api/chat"),
    (Method::POST, "/v1/chat/completions"),
    (Method::POST, "/v1/completions"),
    (Method::POST, "/api/show"),
    (Method::POST, "/api/embed"),
    (Method::POST, "/api/embeddings"),
    (Method::POST, "/v1/embeddings"),
    (Method::POST, "/api/copy"),
    (Method::DELETE, "/api/delete"),
    (Method::POST, "/api/pull"),
    (Method::GET, "/v1/models/"),
    (Method::GET, "/api/tags"),
    (Method::GET, "/api/ps"),
    (Method::GET, "/v1/models"),
    (Method::GET, "/api/version"),
    (Method::GET, "/ready"),
    (Method::GET, "/metrics"),
    (Method::GET, "/"),
];

/// Percent-encodes everything but unreserved characters, for a path segment.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How long an answer may take (DUET_FUZZ_TIMEOUT seconds, default 120), a little less
/// than libFuzzer's own timeout so that the message says which request hung.
fn answer_timeout() -> Duration {
    let secs: u64 = std::env::var("DUET_FUZZ_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs.saturating_sub(5).max(5))
}

/// One request, answered completely: status, content type, body.
fn send(method: Method, uri: &str, body: Vec<u8>) -> (StatusCode, String, Vec<u8>) {
    let s = server();
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "127.0.0.1:11434")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("a request");
    s.rt.block_on(async {
        let work = async {
            let resp = s
                .app
                .clone()
                .oneshot(req)
                .await
                .expect("the router answers");
            let status = resp.status();
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .expect("the body completes")
                .to_bytes()
                .to_vec();
            (status, ctype, body)
        };
        // Wall time, as libFuzzer's -timeout (scripts/fuzz passes the same value).
        tokio::time::timeout(answer_timeout(), work)
            .await
            .expect("an answer in time")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (method, path) = &ROUTES[pick as usize % ROUTES.len()];
    let mut body = rest.to_vec();
    let mut uri = path.to_string();
    if path.ends_with('/') {
        uri.push_str(&segment(&String::from_utf8_lossy(rest)));
        body.clear();
    }
    // A keep_alive would unload and reload the model (a second each, for the
    // tokenizer): KeepAlive's parser is reached through the other fields' checks first,
    // so it is taken out of bodies that parse.
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if let Some(Value::Object(mut o)) = parsed.clone() {
        if o.remove("keep_alive").is_some() {
            body = serde_json::to_vec(&Value::Object(o)).expect("JSON");
        }
    }
    let (status, ctype, bytes) = send(method.clone(), &uri, body);
    if std::env::var_os("DUET_FUZZ_SHOW").is_some() {
        // To see what the inputs reach: `DUET_FUZZ_SHOW=1 …/requests fuzz/seeds/requests/*`.
        let text = String::from_utf8_lossy(&bytes);
        eprintln!(
            "{method} {uri} -> {status} {}",
            text.chars().take(160).collect::<String>()
        );
    }
    assert!(
        status != StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {uri}: 500 {}",
        String::from_utf8_lossy(&bytes)
    );
    let openai = uri.starts_with("/v1/");
    if !status.is_success() {
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method} {uri}: {status} with a body that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        let message = if openai {
            v.pointer("/error/message")
        } else {
            v.get("error")
        };
        assert!(
            message.is_some_and(Value::is_string),
            "{method} {uri}: {status} without an error message in its API's shape: {v}"
        );
    } else if ctype.starts_with("application/json") {
        serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|e| panic!("{method} {uri}: 200 with broken JSON: {e}"));
    } else if ctype.starts_with("application/x-ndjson") {
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            serde_json::from_slice::<Value>(line)
                .unwrap_or_else(|e| panic!("{method} {uri}: a stream line is not JSON: {e}"));
        }
    } else if ctype.starts_with("text/event-stream") {
        let text = String::from_utf8_lossy(&bytes);
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data != "[DONE]" {
                serde_json::from_str::<Value>(data)
                    .unwrap_or_else(|e| panic!("{method} {uri}: an event is not JSON: {e}"));
            }
        }
    }
    // Undo a copy, so that names do not pile up over millions of runs.
    if *path == "/api/copy" && status.is_success() {
        if let Some(dest) = parsed
            .as_ref()
            .and_then(|v| v.get("destination"))
            .and_then(Value::as_str)
        {
            let del = serde_json::json!({ "model": dest.trim() });
            send(Method::DELETE, "/api/delete", del.to_string().into_bytes());
        }
    }
});
