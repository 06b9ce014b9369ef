//! Ollama's native API (docs/api.md): version, tags, show, ps, generate, chat.

use super::stream::{body_response, collect, items, ndjson_line, Item};
use super::tools::{
    chat_items, history_calls, split_answer, ChatItem, Choice, Plan, ToolCall, Tools,
};
use super::{
    keep_alive_of, limits, loaded, logprobs_json, logprobs_of, parse_body, with_headers, ApiError,
    AppState, Extras, Served, Target, OLLAMA_VERSION,
};
use crate::model::grammar::Format;
use crate::model::{Message, Model};
use crate::router::Request;
use crate::serving::{Options, Summary};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

type S = State<Arc<AppState>>;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(root).head(root))
        .route("/api/version", get(version).head(version))
        .route("/api/tags", get(tags).head(tags))
        .route("/api/show", post(show))
        .route("/api/ps", get(ps))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
        .route("/ready", get(ready))
}

async fn root() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Ollama is running",
    )
}

async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION }))
}

/// 200 once every model is loaded and warm, 503 before (and if one failed).
async fn ready(State(st): S) -> Response {
    let models: Vec<Value> = st
        .slots
        .iter()
        .map(|s| {
            let state = match s.state() {
                crate::serving::worker::Load::Ready(_) => "ready",
                crate::serving::worker::Load::Failed(_) => "failed",
                crate::serving::worker::Load::Absent(_) => "absent",
                crate::serving::worker::Load::Unloaded => "unloaded",
                crate::serving::worker::Load::Loading => "loading",
            };
            json!({"name": s.name, "device": s.device.to_string(), "state": state, "error": s.failure(),
                   "queued": s.queue_depth(), "in_flight": s.in_flight()})
        })
        .chain(st.embedders.iter().map(|e| {
            let state = match (e.get(), e.failure()) {
                (Some(_), _) => "ready",
                (_, Some(_)) => "failed",
                _ => "loading",
            };
            json!({"name": e.name, "device": "cpu", "state": state, "error": e.failure()})
        }))
        .collect();
    let ok = st.ready();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ok, "models": models}))).into_response()
}

pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

pub fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Ollama's `details` object.
pub fn details(info: &crate::model::ModelInfo) -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": info.size_label.clone().unwrap_or_else(|| info.parameter_size()),
        "quantization_level": info.quantization,
    })
}

/// "sha256:<hex>": the hf-hub blob name (the file's sha256) when the weights come from
/// the cache, else a digest of the path and size.
pub fn digest(path: &std::path::Path, size: u64) -> String {
    let blob = std::fs::canonicalize(path).ok().and_then(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
    });
    blob.unwrap_or_else(|| hashed_digest((path, size)))
}

/// A stable 64-hex-digit stand-in digest for what has no sha256 of its own.
fn hashed_digest(v: impl std::hash::Hash) -> String {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    format!("{:064x}", h.finish())
}

fn modified_at(path: &std::path::Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(rfc3339)
        .unwrap_or_else(|_| now_rfc3339())
}

async fn tags(State(st): S) -> Json<Value> {
    // Each model under its own name, then the copies made of it (/api/copy).
    let copies = st.copies.all();
    let names = st.slots.iter().flat_map(|s| {
        std::iter::once((s.name.clone(), s)).chain(
            copies
                .iter()
                .filter(|(_, c)| *c == s.name)
                .map(move |(d, _)| (d.clone(), s)),
        )
    });
    let mut models: Vec<Value> = names
        .filter_map(|(n, s)| Some((n, s.file()?)))
        .map(|(name, f)| {
            json!({
                "name": name,
                "model": name,
                "modified_at": modified_at(&f.path),
                "size": f.info.file_size,
                "digest": digest(&f.path, f.info.file_size),
                "details": details(&f.info),
            })
        })
        .collect();
    models.extend(router_entry(&st));
    models.extend(st.embedders.iter().map(|e| embedder_entry(e)));
    Json(json!({ "models": models }))
}

/// `auto`, the router, as /api/tags lists it (so clients that only offer discovered
/// models can pick it): the details of the largest model it routes to.
fn router_entry(st: &AppState) -> Option<Value> {
    let name = st.routed_names.first()?;
    let files: Vec<_> = st.slots.iter().filter_map(|s| s.file()).collect();
    let largest = files.iter().max_by_key(|f| f.info.parameter_count)?;
    let paths: Vec<&std::path::Path> = files.iter().map(|f| f.path.as_path()).collect();
    let digest = hashed_digest(&paths);
    Some(json!({
        "name": name,
        "model": name,
        "modified_at": modified_at(&largest.path),
        "size": largest.info.file_size,
        "digest": digest,
        "details": details(&largest.info),
    }))
}

/// An embedding model as /api/tags lists it.
fn embedder_entry(e: &crate::model::embed::EmbedSlot) -> Value {
    let weights = e.dir.join("model.safetensors");
    json!({
        "name": e.name,
        "model": e.name,
        "modified_at": modified_at(&weights),
        "size": e.size,
        "digest": digest(&weights, e.size),
        "details": embedder_details(e),
    })
}

fn embedder_details(e: &crate::model::embed::EmbedSlot) -> Value {
    let p = e.parameter_count as f64;
    json!({
        "parent_model": "",
        "format": "safetensors",
        "family": "bert",
        "families": ["bert"],
        "parameter_size": if p >= 1e9 { format!("{:.2}B", p / 1e9) } else { format!("{:.0}M", p / 1e6) },
        "quantization_level": "F32",
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

async fn show(State(st): S, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: ShowRequest = parse_body(&body)?;
    if let Some(e) = st.embedder(
        req.model
            .as_deref()
            .or(req.name.as_deref())
            .unwrap_or_default(),
    ) {
        let mut info = serde_json::Map::new();
        info.insert("general.architecture".into(), json!("bert"));
        info.insert("general.basename".into(), json!("all-MiniLM-L6-v2"));
        info.insert("general.parameter_count".into(), json!(e.parameter_count));
        if let Some(m) = e.get() {
            info.insert("bert.context_length".into(), json!(m.max_tokens));
            info.insert("bert.embedding_length".into(), json!(m.dims));
            info.insert("bert.pooling_type".into(), json!("mean"));
        }
        return Ok(Json(json!({
            "license": "",
            "modelfile": format!("# Modelfile generated by duet\nFROM {}\n", e.dir.display()),
            "parameters": "",
            "template": "",
            "details": embedder_details(e),
            "model_info": Value::Object(info),
            "capabilities": ["embedding"],
            "modified_at": modified_at(&e.dir.join("model.safetensors")),
        })));
    }
    let t = st.target(
        req.model.as_deref().or(req.name.as_deref()),
        Request::default,
    )?;
    let file = t.file()?;
    let info = &file.info;
    let a = &info.architecture;
    let mut model_info = serde_json::Map::new();
    let mut put = |k: String, v: Value| {
        model_info.insert(k, v);
    };
    put("general.architecture".into(), json!(a));
    put(
        "general.basename".into(),
        json!(info
            .basename
            .clone()
            .or_else(|| info.name.clone())
            .unwrap_or_else(|| t.slot.name.clone())),
    );
    if let Some(size) = &info.size_label {
        put("general.size_label".into(), json!(size));
    }
    put(
        "general.parameter_count".into(),
        json!(info.parameter_count),
    );
    put("general.file_type".into(), json!(info.quantization));
    if let Some(n) = &info.name {
        put("general.name".into(), json!(n));
    }
    put(format!("{a}.context_length"), json!(info.context_length));
    put(
        format!("{a}.embedding_length"),
        json!(info.embedding_length),
    );
    put(format!("{a}.block_count"), json!(info.block_count));
    put(
        format!("{a}.feed_forward_length"),
        json!(info.feed_forward_length),
    );
    put(format!("{a}.attention.head_count"), json!(info.head_count));
    put(
        format!("{a}.attention.head_count_kv"),
        json!(info.head_count_kv),
    );
    put(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        json!(info.rms_norm_eps),
    );
    put(format!("{a}.rope.freq_base"), json!(info.rope_freq_base));
    put("tokenizer.ggml.model".into(), json!("gpt2"));
    put(
        "tokenizer.ggml.eos_token_id".into(),
        json!(info.eos_token_id),
    );
    put(
        "tokenizer.ggml.bos_token_id".into(),
        json!(info.bos_token_id),
    );
    put("duet.device".into(), json!(t.slot.device.to_string()));
    let parameters = "stop                           \"<|im_start|>\"\nstop                           \"<|im_end|>\"\nstop                           \"<|endoftext|>\"";
    Ok(Json(json!({
        "license": "",
        "modelfile": format!("# Modelfile generated by duet\nFROM {}\n", file.path.display()),
        "parameters": parameters,
        // Clients read features off Ollama's Go template (Continue enables FIM when it
        // holds .Suffix); duet itself renders the GGUF's Jinja template.
        "template": OLLAMA_TEMPLATE,
        "details": details(info),
        "model_info": Value::Object(model_info),
        "capabilities": capabilities(info),
        "modified_at": modified_at(&file.path),
    })))
}

/// The Qwen2.5 family's template in Ollama's Go-template form (FIM with .Suffix, tools,
/// tool calls and results), as `/api/show` reports it.
pub const OLLAMA_TEMPLATE: &str = include_str!("qwen2.gotmpl");

/// Ollama's capabilities of a model: "completion"; "tools" where its chat template
/// renders tools; "insert" where its vocabulary has the fill-in-the-middle tokens.
pub fn capabilities(info: &crate::model::ModelInfo) -> Vec<&'static str> {
    let mut c = vec!["completion"];
    if info
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("tools") && t.contains("tool_call"))
    {
        c.push("tools");
    }
    if info.fill_in_middle {
        c.push("insert");
    }
    c
}

/// When a model unloads, as a wall-clock time; a model kept forever shows a date a
/// century ahead.
pub fn expires_rfc3339(at: Option<std::time::Instant>) -> String {
    let now = std::time::SystemTime::now();
    let left = match at {
        Some(at) => at.saturating_duration_since(std::time::Instant::now()),
        None => std::time::Duration::from_secs(100 * 365 * 86400),
    };
    rfc3339(now + left)
}

async fn ps(State(st): S) -> Json<Value> {
    // Embedding models stay loaded for the life of the server.
    let expires = expires_rfc3339(None);
    let models: Vec<Value> = st
        .slots
        .iter()
        .filter(|s| s.is_ready())
        .filter_map(|s| Some((s, s.file()?)))
        .map(|(s, f)| {
            let expires = expires_rfc3339(s.expires_at());
            let size = f.info.file_size;
            json!({
                "name": s.name,
                "model": s.name,
                "size": size,
                "digest": digest(&f.path, size),
                "details": details(&f.info),
                "expires_at": expires,
                "size_vram": if s.device.is_cuda() { size } else { 0 },
                "context_length": crate::serving::sampling::DEFAULT_NUM_CTX,
                "device": s.device.to_string(),
            })
        })
        .collect();
    let mut models = models;
    models.extend(st.embedders.iter().filter_map(|e| {
        let m = e.get()?;
        let mut v = embedder_entry(e);
        v["expires_at"] = json!(expires);
        v["size_vram"] = json!(0);
        v["context_length"] = json!(m.max_tokens);
        v["device"] = json!("cpu");
        Some(v)
    }));
    Json(json!({ "models": models }))
}

/// Parses Ollama's `options` object; unknown keys are ignored, a `null` value is the
/// option's default (Zed sends them), wrong types are a 400.
pub fn parse_options(v: Option<Value>) -> Result<Options, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Options::default()),
        Some(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.retain(|_, v| !v.is_null());
            }
            let o: Options = serde_json::from_value(v)
                .map_err(|e| ApiError::bad_request(format!("invalid options: {e}")))?;
            o.validate()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(o)
        }
    }
}

/// Ollama's `format`, as a grammar for the model's answer (a schema of bounded size).
fn parse_format(format: &Option<Value>) -> Result<Option<Format>, ApiError> {
    let f = Format::from_ollama(format.as_ref()).map_err(ApiError::bad_request)?;
    if let Some(Format::Schema(s)) = &f {
        limits::check_schema(s)?;
    }
    Ok(f)
}

fn reject_images(images: &[Value], model: &str) -> Result<(), ApiError> {
    if images.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "model '{model}' does not support images (it is text-only)"
        )))
    }
}

/// The model field of replies: what the client asked for, or the model a routed request landed on.
fn reply_name(t: &Target) -> String {
    if t.routed {
        t.slot.name.clone()
    } else {
        t.requested.clone()
    }
}

fn stats(s: &Summary) -> serde_json::Map<String, Value> {
    let ns = |d: std::time::Duration| json!(d.as_nanos() as u64);
    let mut m = serde_json::Map::new();
    m.insert("done_reason".into(), json!(s.done_reason.as_str()));
    m.insert("total_duration".into(), ns(s.total_duration));
    m.insert("load_duration".into(), ns(s.load_duration));
    m.insert("prompt_eval_count".into(), json!(s.prompt_eval_count));
    m.insert("prompt_eval_duration".into(), ns(s.prompt_eval_duration));
    m.insert("eval_count".into(), json!(s.eval_count));
    m.insert("eval_duration".into(), ns(s.eval_duration));
    m
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct GenerateRequest {
    model: Option<String>,
    prompt: String,
    suffix: String,
    system: Option<String>,
    template: Option<String>,
    context: Vec<u32>,
    stream: Option<bool>,
    raw: bool,
    format: Option<Value>,
    images: Option<Vec<Value>>,
    options: Option<Value>,
    think: Option<Value>,
    keep_alive: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

/// Qwen2.5-Coder's fill-in-the-middle prompt, as Ollama's template writes it for `suffix`.
pub fn fim_prompt(prefix: &str, suffix: &str) -> String {
    format!("<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
}

/// num_predict as the client set it in `options`, for the router.
pub fn requested_predict(options: &Option<Value>) -> Option<i32> {
    options
        .as_ref()?
        .get("num_predict")?
        .as_i64()
        .map(|n| n.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
}

async fn generate(State(st): S, body: Bytes) -> Result<Response, ApiError> {
    let req: GenerateRequest = parse_body(&body)?;
    let t = st.target(req.model.as_deref(), || Request {
        prompt: &req.prompt,
        system: req.system.as_deref(),
        turns: 1,
        num_predict: requested_predict(&req.options),
    })?;
    let served = Served::of(&t);
    Ok(with_headers(served, generate_routed(st, req, t).await))
}

/// An empty request with `keep_alive: 0` unloads its model (Open WebUI's "eject"),
/// without loading it first.
fn unload_request(
    st: &AppState,
    t: &Target,
    keep_alive: &Option<Value>,
) -> Result<Option<Value>, ApiError> {
    // Only an explicit keep_alive of 0 unloads (not a server default of 0).
    if keep_alive.is_none() || !keep_alive_of(st, keep_alive)?.is_zero() {
        return Ok(None);
    }
    t.slot.unload();
    Ok(Some(
        json!({"model": reply_name(t), "created_at": now_rfc3339(), "done": true, "done_reason": "unload"}),
    ))
}

async fn generate_routed(
    st: Arc<AppState>,
    req: GenerateRequest,
    mut t: Target,
) -> Result<Response, ApiError> {
    let empty = req.prompt.is_empty() && req.suffix.is_empty() && req.context.is_empty();
    if empty {
        if let Some(mut v) = unload_request(&st, &t, &req.keep_alive)? {
            v["response"] = json!("");
            return Ok(Json(v).into_response());
        }
    }
    reject_images(req.images.as_deref().unwrap_or_default(), &t.requested)?;
    let format = parse_format(&req.format)?;
    reject_think(&req.think, &t.requested)?;
    if req.template.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(
            "custom templates are not supported: duet renders the model's own chat template (use raw to send a prompt as is)",
        ));
    }
    let mut options = parse_options(req.options)?;
    let logprobs = logprobs_of(req.logprobs, req.top_logprobs)?;
    let model: Arc<Model> = loaded(&st, &mut t, &req.keep_alive).await?;
    if empty {
        // Ollama answers an empty prompt by (re)loading the model.
        t.slot.refresh();
        return Ok(Json(json!({"model": reply_name(&t), "created_at": now_rfc3339(), "response": "", "done": true, "done_reason": "load"})).into_response());
    }
    if let Some(bad) = req
        .context
        .iter()
        .find(|&&t| t as usize >= model.codec.vocab_size())
    {
        return Err(ApiError::bad_request(format!(
            "context holds token id {bad}, outside the vocabulary"
        )));
    }
    // The chat template's messages, with the routed tier's policy applied.
    let mut messages = Vec::new();
    if !req.raw && req.suffix.is_empty() {
        if let Some(sys) = req.system.as_deref().filter(|s| !s.is_empty()) {
            messages.push(Message::new("system", sys));
        }
        messages.push(Message::new("user", &req.prompt));
        t.apply_tier_policy(&st, &mut messages, &mut options);
    }
    st.cap_predict(&mut options, &model);
    let stream = req.stream.unwrap_or(true);
    // Cut to num_ctx, rendered and tokenized off the async threads.
    let budget = limits::budget(&options, &model);
    let m = model.clone();
    let (tokens, constraint) = limits::blocking(&st.metrics, move || {
        let text = if req.raw {
            limits::cut(&req.prompt, budget).into_owned()
        } else if !req.suffix.is_empty() {
            let (prefix, suffix) = limits::cut_fim(&req.prompt, &req.suffix, budget);
            fim_prompt(prefix, suffix)
        } else {
            let text = m.render_chat(&messages)?;
            limits::cut(&text, budget).into_owned()
        };
        let mut tokens = req.context;
        tokens.extend(m.tokenize(&text)?);
        let constraint = format.map(|f| m.constraint(&f)).transpose()?;
        Ok((tokens, constraint))
    })
    .await?;
    let extras = Extras {
        constraint,
        logprobs,
        score_from: None,
    };
    let with_logprobs = extras.logprobs.is_some();
    let running = st.submit_routed(t, tokens, options, extras).await?;
    let name = reply_name(&running.target);
    let final_fields = move |s: &Summary| {
        let mut m = stats(s);
        m.insert("context".into(), json!(s.context));
        m
    };
    if stream {
        let lines = items(running.events).map(move |item| match item {
            Item::Text(text, l) => {
                let mut v = json!({"model": name, "created_at": now_rfc3339(), "response": text, "done": false});
                if with_logprobs {
                    v["logprobs"] = logprobs_json(&l);
                }
                ndjson_line(&v)
            }
            Item::Done(s) => {
                let mut m = final_fields(&s);
                m.insert("model".into(), json!(name));
                m.insert("created_at".into(), json!(now_rfc3339()));
                m.insert("response".into(), json!(""));
                m.insert("done".into(), json!(true));
                ndjson_line(&Value::Object(m))
            }
            Item::Error(e) => ndjson_line(&json!({ "error": e })),
        });
        return Ok(body_response("application/x-ndjson", lines));
    }
    let c = collect(running.events).await?;
    let mut m = final_fields(&c.summary);
    m.insert("model".into(), json!(name));
    m.insert("created_at".into(), json!(now_rfc3339()));
    m.insert("response".into(), json!(c.text));
    m.insert("done".into(), json!(true));
    if with_logprobs {
        m.insert("logprobs".into(), logprobs_json(&c.logprobs));
    }
    Ok(Json(Value::Object(m)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatMessage {
    role: String,
    content: Option<String>,
    images: Option<Vec<Value>>,
    tool_calls: Option<Vec<Value>>,
    /// A tool result's tool (Ollama's `tool_name`; the template does not show it).
    #[allow(dead_code)]
    tool_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    stream: Option<bool>,
    format: Option<Value>,
    options: Option<Value>,
    think: Option<Value>,
    keep_alive: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

/// `think`: false or absent is fine; these models do not think, so anything else is
/// refused as Ollama refuses it for such models.
fn reject_think(think: &Option<Value>, model: &str) -> Result<(), ApiError> {
    match think {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(_) => Err(ApiError::bad_request(format!(
            "\"{model}\" does not support thinking"
        ))),
    }
}

/// What the router sees of a conversation: the last user message is what is asked.
pub fn chat_request<'a>(
    messages: impl DoubleEndedIterator<Item = (&'a str, &'a str)> + Clone,
    num_predict: Option<i32>,
) -> Request<'a> {
    let turns = messages.clone().count();
    let system = messages
        .clone()
        .find(|(r, _)| *r == "system")
        .map(|(_, c)| c);
    let prompt = messages
        .rev()
        .find(|(r, _)| *r == "user")
        .map(|(_, c)| c)
        .unwrap_or_default();
    Request {
        prompt,
        system,
        turns,
        num_predict,
    }
}

async fn chat(State(st): S, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(&body)?;
    let t = st.target(req.model.as_deref(), || {
        chat_request(
            req.messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_deref().unwrap_or_default())),
            requested_predict(&req.options),
        )
    })?;
    let served = Served::of(&t);
    Ok(with_headers(served, chat_routed(st, req, t).await))
}

async fn chat_routed(
    st: Arc<AppState>,
    req: ChatRequest,
    mut t: Target,
) -> Result<Response, ApiError> {
    if req.messages.is_empty() {
        if let Some(mut v) = unload_request(&st, &t, &req.keep_alive)? {
            v["message"] = json!({"role": "assistant", "content": ""});
            return Ok(Json(v).into_response());
        }
    }
    limits::check_messages(req.messages.len())?;
    let format = parse_format(&req.format)?;
    reject_think(&req.think, &t.requested)?;
    let tools = Tools::parse(req.tools.as_deref().unwrap_or_default())?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        reject_images(m.images.as_deref().unwrap_or_default(), &t.requested)?;
        if m.role.is_empty() {
            return Err(ApiError::bad_request("every message needs a role"));
        }
        let mut msg = Message::new(&m.role, m.content.as_deref().unwrap_or_default());
        if let Some(calls) = m.tool_calls.as_deref().filter(|c| !c.is_empty()) {
            msg.tool_calls = Some(history_calls(calls)?);
        }
        messages.push(msg);
    }
    let mut options = parse_options(req.options)?;
    let logprobs = logprobs_of(req.logprobs, req.top_logprobs)?;
    let model = loaded(&st, &mut t, &req.keep_alive).await?;
    if messages.is_empty() {
        t.slot.refresh();
        return Ok(Json(json!({"model": reply_name(&t), "created_at": now_rfc3339(), "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": true})).into_response());
    }
    let mut plan = Plan::new(tools, &Choice::Auto);
    if format.is_some() {
        // The client asked for JSON content (LiteLLM's fallback for tool calls reads it
        // itself): it is not turned into calls.
        plan.parser = None;
    }
    t.apply_tier_policy(&st, &mut messages, &mut options);
    st.cap_predict(&mut options, &model);
    let (specs, opening) = (plan.specs.clone(), plan.opening.clone());
    let (prompt, constraint) = limits::prepare_chat(
        &st.metrics,
        &model,
        messages,
        specs,
        opening,
        format,
        limits::budget(&options, &model),
    )
    .await?;
    let extras = Extras {
        constraint,
        logprobs,
        score_from: None,
    };
    let with_logprobs = extras.logprobs.is_some();
    let running = st.submit_routed(t, prompt, options, extras).await?;
    let name = reply_name(&running.target);
    let finish = move |name: &str, s: &Summary, content: String, calls: &[ToolCall]| {
        let mut m = stats(s);
        m.insert("model".into(), json!(name));
        m.insert("created_at".into(), json!(now_rfc3339()));
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = calls.iter().map(ToolCall::ollama).collect();
        }
        m.insert("message".into(), message);
        m.insert("done".into(), json!(true));
        Value::Object(m)
    };
    if req.stream.unwrap_or(true) {
        let lines = chat_items(items(running.events), plan.parser).map(move |item| match item {
            ChatItem::Text(text, l) => {
                let mut v = json!({"model": name, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": text}, "done": false});
                if with_logprobs {
                    v["logprobs"] = logprobs_json(&l);
                }
                ndjson_line(&v)
            }
            ChatItem::Call(c) => ndjson_line(&json!({"model": name, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": "", "tool_calls": [c.ollama()]}, "done": false})),
            ChatItem::Done(s) => ndjson_line(&finish(&name, &s, String::new(), &[])),
            ChatItem::Error(e) => ndjson_line(&json!({ "error": e })),
        });
        return Ok(body_response("application/x-ndjson", lines));
    }
    let c = collect(running.events).await?;
    let (content, calls) = split_answer(&c.text, plan.parser);
    let mut v = finish(&name, &c.summary, content, &calls);
    if with_logprobs {
        v["logprobs"] = logprobs_json(&c.logprobs);
    }
    Ok(Json(v).into_response())
}
