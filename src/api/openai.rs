//! The OpenAI-compatible API Ollama also serves: /v1/chat/completions, /v1/completions,
//! /v1/models. Errors take OpenAI's shape, `{"error": {"message", "type", ...}}`.

use super::ollama::{chat_request, fim_prompt};
use super::stream::{body_response, collect, items, sse_event};
use super::tools::{
    chat_items, history_calls, split_answer, ChatItem, Choice, Plan, ToolCall, Tools,
};
use super::{
    limits, loaded, logprobs_json, logprobs_of, parse_body, with_headers, ApiError, AppState,
    Extras, Served, Target,
};
use crate::model::grammar::Format;
use crate::model::Message;
use crate::router::Request;
use crate::serving::{Options, Summary};
use axum::body::Bytes;
use axum::extract::{Path, State};
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
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
}

/// An error in OpenAI's shape.
pub struct OpenAiError(ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::model::EngineError> for OpenAiError {
    fn from(e: crate::model::EngineError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let kind = match self.0.status.as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            404 => "not_found_error",
            503 => "server_busy_error",
            _ => "api_error",
        };
        (
            self.0.status,
            Json(json!({"error": {"message": self.0.message, "type": kind, "param": null, "code": null}})),
        )
            .into_response()
    }
}

type Result<T> = std::result::Result<T, OpenAiError>;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_id(prefix: &str) -> String {
    format!("{prefix}-{}", rand::random::<u32>() % 1000)
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_eval_count,
        "completion_tokens": s.eval_count,
        "total_tokens": s.prompt_eval_count + s.eval_count,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

/// The sampling fields both endpoints share, mapped onto Ollama's options the way
/// Ollama's compatibility layer maps them (temperature and top_p default to 1).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Sampling {
    max_tokens: Option<i32>,
    max_completion_tokens: Option<i32>,
    stop: Option<Stop>,
    seed: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    n: Option<u32>,
}

impl Sampling {
    fn options(&self) -> std::result::Result<Options, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported"));
        }
        let mut o = Options {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            ..Options::default()
        };
        if let Some(seed) = self.seed {
            o.seed = seed;
        }
        if let Some(n) = self.max_completion_tokens.or(self.max_tokens) {
            if n < 0 {
                return Err(ApiError::bad_request("max_tokens must be >= 0"));
            }
            o.num_predict = n;
        }
        o.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        o.stop.retain(|s| !s.is_empty());
        o.validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(o)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    response_format: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn message_text(m: &ChatMessage) -> std::result::Result<String, ApiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "content part of type '{other}' is not supported (text-only models)"
                        )))
                    }
                    None => return Err(ApiError::bad_request("content part without a type")),
                }
            }
            Ok(text)
        }
    }
}

/// OpenAI's `response_format`: text, `json_object`, or `json_schema` with its schema.
fn response_format(v: Option<&Value>) -> std::result::Result<Option<Format>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Format::Json)),
        Some("json_schema") => match v.pointer("/json_schema/schema") {
            Some(schema) if schema.is_object() => {
                limits::check_schema(schema)?;
                Ok(Some(Format::Schema(schema.clone())))
            }
            _ => Err(ApiError::bad_request(
                "response_format json_schema needs json_schema.schema, a JSON schema object",
            )),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "response_format '{other}' is not one of text, json_object, json_schema"
        ))),
    }
}

fn finish_reason(s: &Summary) -> &'static str {
    s.done_reason.as_str()
}

async fn chat_completions(State(st): S, body: Bytes) -> Result<Response> {
    let req: ChatRequest = parse_body(&body)?;
    let texts: Vec<String> = req
        .messages
        .iter()
        .map(|m| message_text(m).unwrap_or_default())
        .collect();
    let t = st.target(req.model.as_deref(), || {
        chat_request(
            req.messages
                .iter()
                .zip(&texts)
                .map(|(m, t)| (m.role.as_str(), t.as_str())),
            req.sampling
                .max_completion_tokens
                .or(req.sampling.max_tokens),
        )
    })?;
    let served = Served::of(&t);
    Ok(with_headers(served, chat_routed(st, req, t).await))
}

async fn chat_routed(st: Arc<AppState>, req: ChatRequest, mut t: Target) -> Result<Response> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").into());
    }
    limits::check_messages(req.messages.len())?;
    let tools = Tools::parse(req.tools.as_deref().unwrap_or_default())?;
    let choice = Choice::parse(req.tool_choice.as_ref(), &tools)?;
    let format = response_format(req.response_format.as_ref())?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let mut msg = Message::new(&m.role, &message_text(m)?);
        if let Some(calls) = m.tool_calls.as_deref().filter(|c| !c.is_empty()) {
            msg.tool_calls = Some(history_calls(calls)?);
        }
        messages.push(msg);
    }
    let mut options = req.sampling.options()?;
    let logprobs = logprobs_of(req.logprobs, req.top_logprobs)?;
    let model = loaded(&st, &mut t, &None).await?;
    let mut plan = Plan::new(tools, &choice);
    if format.is_some() && plan.grammar.is_none() {
        plan.parser = None; // JSON content was asked for, not calls
    }
    t.apply_tier_policy(&st, &mut messages, &mut options);
    st.cap_predict(&mut options, &model);
    let (prompt, constraint) = limits::prepare_chat(
        &st.metrics,
        &model,
        messages,
        plan.specs.clone(),
        plan.opening.clone(),
        plan.grammar.take().or(format),
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
    let name = running.target.slot.name.clone();
    let id = completion_id("chatcmpl");
    let created = unix_now();
    let chunk = move |delta: Delta, finish: Option<&str>| {
        let mut logprobs = Value::Null;
        let delta = match delta {
            Delta::Text(text, l) => {
                if with_logprobs {
                    logprobs = json!({"content": logprobs_json(l)});
                }
                json!({"role": "assistant", "content": text})
            }
            Delta::Call(c) => {
                let mut call = c.openai();
                call["index"] = json!(c.index);
                json!({"role": "assistant", "content": null, "tool_calls": [call]})
            }
            Delta::None => json!({}),
        };
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
               "system_fingerprint": "fp_ollama",
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let items = chat_items(items(running.events), plan.parser);
        return Ok(sse_body(items, include_usage, chunk));
    }
    let c = collect(running.events).await?;
    let (content, calls) = split_answer(&c.text, plan.parser);
    let mut message = json!({"role": "assistant", "content": content});
    let mut finish = finish_reason(&c.summary);
    if !calls.is_empty() {
        message["tool_calls"] = calls.iter().map(ToolCall::openai).collect();
        if content.is_empty() {
            message["content"] = Value::Null;
        }
        finish = "tool_calls";
    }
    Ok(Json(json!({
        "id": completion_id("chatcmpl"),
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": if with_logprobs { json!({"content": logprobs_json(&c.logprobs)}) } else { Value::Null }}],
        "usage": usage(&c.summary),
    }))
    .into_response())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<Value>,
    suffix: Option<String>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// The legacy API's number of alternatives per token (its log probabilities).
    logprobs: Option<i64>,
    /// With `max_tokens` 0: the prompt back with each token's log probability.
    echo: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

async fn completions(State(st): S, body: Bytes) -> Result<Response> {
    let req: CompletionRequest = parse_body(&body)?;
    let text = req
        .prompt
        .as_ref()
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let t = st.target(req.model.as_deref(), || Request {
        prompt: &text,
        system: None,
        turns: 1,
        num_predict: req
            .sampling
            .max_completion_tokens
            .or(req.sampling.max_tokens),
    })?;
    let served = Served::of(&t);
    Ok(with_headers(served, completions_routed(st, req, t).await))
}

async fn completions_routed(
    st: Arc<AppState>,
    req: CompletionRequest,
    mut t: Target,
) -> Result<Response> {
    let prompt = match &req.prompt {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        None => return Err(ApiError::bad_request("prompt is required").into()),
        Some(_) => return Err(ApiError::bad_request("prompt must be a string").into()),
    };
    let mut options = req.sampling.options()?;
    // The legacy API's `logprobs` is the number of alternatives (0 to 5 in OpenAI's).
    let top = match req.logprobs {
        Some(n) => logprobs_of(Some(true), Some(n))?,
        None => None,
    };
    if req.echo {
        let max_tokens = req
            .sampling
            .max_completion_tokens
            .or(req.sampling.max_tokens);
        if max_tokens != Some(0) || req.stream || req.suffix.is_some() {
            return Err(ApiError::bad_request(
                "echo is supported with max_tokens 0 and without stream or suffix: it scores the prompt and generates nothing",
            )
            .into());
        }
        let model = loaded(&st, &mut t, &None).await?;
        return echo_scores(&st, t, model, prompt, options, top).await;
    }
    let model = loaded(&st, &mut t, &None).await?;
    // As Ollama does: the prompt goes through the chat template, or FIM with a suffix;
    // cut to num_ctx, rendered and tokenized off the async threads.
    let mut messages = vec![Message::new("user", &prompt)];
    if req.suffix.as_deref().is_none_or(str::is_empty) {
        t.apply_tier_policy(&st, &mut messages, &mut options);
    }
    st.cap_predict(&mut options, &model);
    let budget = limits::budget(&options, &model);
    let (m, suffix) = (model.clone(), req.suffix.clone());
    let tokens = limits::blocking(&st.metrics, move || {
        let text = match suffix.as_deref().filter(|s| !s.is_empty()) {
            Some(suffix) => {
                let (prefix, suffix) = limits::cut_fim(&prompt, suffix, budget);
                fim_prompt(prefix, suffix)
            }
            None => {
                let text = m.render_chat(&messages)?;
                limits::cut(&text, budget).into_owned()
            }
        };
        Ok(m.tokenize(&text)?)
    })
    .await?;
    let running = st
        .submit_routed(
            t,
            tokens,
            options,
            Extras {
                logprobs: top,
                ..Extras::default()
            },
        )
        .await?;
    let name = running.target.slot.name.clone();
    let id = completion_id("cmpl");
    let created = unix_now();
    // Where the next streamed token starts in the completion's text.
    let offset = std::sync::atomic::AtomicUsize::new(0);
    let chunk = move |delta: Delta, finish: Option<&str>| {
        let (text, l) = match delta {
            Delta::Text(t, l) => (t, l),
            _ => ("", &[][..]),
        };
        let len: usize = l.iter().map(|p| p.token.token.len()).sum();
        let at = offset.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        let logprobs = match top {
            Some(_) => legacy_logprobs(l, at),
            None => Value::Null,
        };
        json!({"id": id, "object": "text_completion", "created": created, "model": name,
               "system_fingerprint": "fp_ollama",
               "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]})
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse_body(
            chat_items(items(running.events), None),
            include_usage,
            chunk,
        ));
    }
    let c = collect(running.events).await?;
    Ok(Json(json!({
        "id": completion_id("cmpl"),
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": "fp_ollama",
        "choices": [{"text": c.text, "index": 0, "finish_reason": finish_reason(&c.summary),
                     "logprobs": if top.is_some() { legacy_logprobs(&c.logprobs, 0) } else { Value::Null }}],
        "usage": usage(&c.summary),
    }))
    .into_response())
}

/// `echo` with `max_tokens` 0: the prompt, taken as raw text (no chat template), with
/// the log probability of each of its tokens under the model (the first has none), as
/// evaluation harnesses ask for a text's likelihood.
async fn echo_scores(
    st: &Arc<AppState>,
    t: Target,
    model: Arc<crate::model::Model>,
    prompt: String,
    mut options: Options,
    top: Option<usize>,
) -> Result<Response> {
    let (m, text) = (model.clone(), prompt.clone());
    let tokens = limits::blocking(&st.metrics, move || Ok(m.tokenize(&text)?)).await?;
    let Some(&first) = tokens.first() else {
        return Err(ApiError::bad_request("echo needs a prompt to score").into());
    };
    // Every token is scored: the context holds the whole text (or the request fails).
    options.num_ctx = options.num_ctx.max(tokens.len() + 1);
    let (prompt_tokens, cached, scored) = if tokens.len() < 2 {
        (tokens.len(), 0, vec![])
    } else {
        let extras = Extras {
            logprobs: Some(top.unwrap_or(0)),
            score_from: Some(1),
            constraint: None,
        };
        let c = match collect(st.submit_with(t, tokens, options, extras)?.events).await {
            Ok(c) => c,
            // The text itself cannot be scored (longer than the context): the client's.
            Err(e)
                if e.message
                    .starts_with(crate::serving::sequence::TOO_LONG_TO_SCORE) =>
            {
                return Err(ApiError::bad_request(e.message).into())
            }
            Err(e) => return Err(e.into()),
        };
        let s = c.summary;
        (s.prompt_eval_count, s.cached_tokens, c.logprobs)
    };
    let first = crate::serving::Logprob {
        token: crate::serving::TokenLogprob {
            token: String::from_utf8_lossy(&model.codec.token_bytes(first)).into_owned(),
            logprob: f32::NAN,
            bytes: vec![],
        },
        top_logprobs: vec![],
    };
    let mut logprobs = legacy_logprobs(&[&[first][..], &scored].concat(), 0);
    // The first token has no log probability (nothing comes before it), as in OpenAI's.
    logprobs["token_logprobs"][0] = Value::Null;
    logprobs["top_logprobs"][0] = Value::Null;
    if top.is_none() {
        logprobs["top_logprobs"] = Value::Null;
    }
    Ok(Json(json!({
        "id": completion_id("cmpl"),
        "object": "text_completion",
        "created": unix_now(),
        "model": model.name,
        "system_fingerprint": "fp_ollama",
        "choices": [{"text": prompt, "index": 0, "finish_reason": "length", "logprobs": logprobs}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }))
    .into_response())
}

/// The legacy completions API's log probabilities: parallel lists of tokens, their
/// log probabilities, each place's alternatives, and the tokens' offsets in the text
/// (from `offset`).
fn legacy_logprobs(l: &[crate::serving::Logprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(l.len());
    for p in l {
        offsets.push(at);
        at += p.token.token.len();
    }
    json!({
        "tokens": l.iter().map(|p| p.token.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": l.iter().map(|p| p.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": l.iter().map(|p| {
            p.top_logprobs.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// What one streamed chunk carries.
enum Delta<'a> {
    Text(&'a str, &'a [crate::serving::Logprob]),
    Call(&'a ToolCall),
    None,
}

/// Server-sent events of a streamed completion: one chunk per piece of text or tool call
/// (built by `chunk(delta, finish_reason)`), a final chunk with the finish reason
/// ("tool_calls" after calls), the usage chunk when asked for, then `[DONE]`. An error
/// after the stream started is sent as an event.
fn sse_body(
    items: impl futures_util::Stream<Item = ChatItem> + Send + 'static,
    include_usage: bool,
    chunk: impl Fn(Delta, Option<&str>) -> Value + Send + 'static,
) -> Response {
    let mut called = false;
    let events = items.flat_map(move |item| {
        let out: Vec<String> = match item {
            ChatItem::Text(text, l) => {
                vec![sse_event(&chunk(Delta::Text(&text, &l), None).to_string())]
            }
            ChatItem::Call(c) => {
                called = true;
                vec![sse_event(&chunk(Delta::Call(&c), None).to_string())]
            }
            ChatItem::Done(s) => {
                let finish = if called { "tool_calls" } else { finish_reason(&s) };
                let mut v = vec![sse_event(&chunk(Delta::None, Some(finish)).to_string())];
                if include_usage {
                    let mut u = chunk(Delta::None, None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    v.push(sse_event(&u.to_string()));
                }
                v.push(sse_event("[DONE]"));
                v
            }
            ChatItem::Error(e) => vec![
                sse_event(&json!({"error": {"message": e, "type": "api_error", "param": null, "code": null}}).to_string()),
                sse_event("[DONE]"),
            ],
        };
        futures_util::stream::iter(out)
    });
    body_response("text/event-stream", events)
}

fn model_object(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "library"})
}

fn created_of(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(st): S) -> Json<Value> {
    let data: Vec<Value> = st
        .slots
        .iter()
        .filter_map(|s| Some(model_object(&s.name, created_of(&s.file()?.path))))
        // The router, so clients that only offer listed models can pick it.
        .chain(
            st.routed_names
                .first()
                .filter(|_| st.slots.iter().any(|s| s.file().is_some()))
                .map(|n| model_object(n, unix_now())),
        )
        .chain(
            st.embedders
                .iter()
                .map(|e| model_object(&e.name, created_of(&e.dir.join("model.safetensors")))),
        )
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn model(State(st): S, Path(id): Path<String>) -> Result<Json<Value>> {
    if let Some(e) = st.embedder(&id) {
        return Ok(Json(model_object(
            &id,
            created_of(&e.dir.join("model.safetensors")),
        )));
    }
    let t = st.target(Some(&id), Request::default)?;
    Ok(Json(model_object(&id, created_of(&t.file()?.path))))
}
