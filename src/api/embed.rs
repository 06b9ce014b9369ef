//! Embeddings: Ollama's `/api/embed` and legacy `/api/embeddings`, and OpenAI's
//! `/v1/embeddings`, served by the embedding models of models.toml (`all-minilm`).
//!
//! The chat models do not answer these routes (a 400 says so): Qwen2.5-Coder was not
//! trained to embed, and a mean of its hidden states would be a poor retrieval vector
//! under a name clients would trust.

use super::openai::OpenAiError;
use super::{parse_body, ApiError, AppState};
use crate::model::embed::{normalize, EmbedError, Embedded, Embedder};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

type S = State<Arc<AppState>>;

/// How long a request waits for its embedding model to finish loading.
const LOAD_WAIT: Duration = Duration::from_secs(120);

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/v1/embeddings", post(openai_embeddings))
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> Self {
        let status = match e {
            EmbedError::TooLong { .. } | EmbedError::Tokenize { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The embedding model a request names, once loaded (waiting while it loads).
async fn embedder(st: &AppState, name: Option<&str>) -> Result<(String, Arc<Embedder>), ApiError> {
    let name = name.map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return Err(ApiError::bad_request("model is required"));
    }
    let Some(slot) = st.embedder(name) else {
        if st
            .target(Some(name), crate::router::Request::default)
            .is_ok()
        {
            return Err(ApiError::bad_request(format!(
                "\"{name}\" does not support embeddings (use an embedding model such as all-minilm)"
            )));
        }
        return Err(ApiError::not_found(name));
    };
    let model = slot
        .wait(LOAD_WAIT)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok((slot.name.clone(), model))
}

/// Runs the model off the async threads.
async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EmbedError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("embedding task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

/// `dimensions`: the first d values, normalised again (Ollama's and OpenAI's meaning).
fn shorten(
    vectors: Vec<Vec<f32>>,
    dims: Option<usize>,
    full: usize,
) -> Result<Vec<Vec<f32>>, ApiError> {
    match dims {
        None => Ok(vectors),
        Some(d) if d == 0 || d > full => Err(ApiError::bad_request(format!(
            "dimensions must be between 1 and {full}"
        ))),
        Some(d) => Ok(vectors
            .into_iter()
            .map(|mut v| {
                v.truncate(d);
                normalize(v)
            })
            .collect()),
    }
}

/// Ollama's `input`: a string or a list of strings.
fn inputs(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|x| match x {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::bad_request(
                    "input must be a string or a list of strings",
                )),
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request(
            "input must be a string or a list of strings",
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct EmbedRequest {
    model: Option<String>,
    input: Option<Value>,
    truncate: Option<bool>,
    dimensions: Option<usize>,
    #[allow(dead_code)]
    keep_alive: Option<Value>,
    #[allow(dead_code)]
    options: Option<Value>,
}

async fn embed(State(st): S, body: Bytes) -> Result<Json<Value>, ApiError> {
    let start = Instant::now();
    let req: EmbedRequest = parse_body(&body)?;
    let texts = inputs(req.input)?;
    super::limits::check_inputs(texts.len())?;
    let (name, model) = embedder(&st, req.model.as_deref()).await?;
    let truncate = req.truncate.unwrap_or(true);
    let full = model.dims;
    let load = start.elapsed();
    let m = model.clone();
    let Embedded { vectors, tokens } = run(move || m.embed(&texts, truncate)).await?;
    let vectors = shorten(vectors, req.dimensions, full)?;
    Ok(Json(json!({
        "model": name,
        "embeddings": vectors,
        "total_duration": start.elapsed().as_nanos() as u64,
        "load_duration": load.as_nanos() as u64,
        "prompt_eval_count": tokens,
    })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LegacyRequest {
    model: Option<String>,
    prompt: String,
    #[allow(dead_code)]
    keep_alive: Option<Value>,
    #[allow(dead_code)]
    options: Option<Value>,
}

/// The legacy route: one prompt, the mean vector as it is (not normalised), as Ollama's.
async fn embeddings(State(st): S, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: LegacyRequest = parse_body(&body)?;
    let (_, model) = embedder(&st, req.model.as_deref()).await?;
    if req.prompt.is_empty() {
        return Ok(Json(json!({"embedding": []})));
    }
    let m = model.clone();
    let text = req.prompt;
    let out = run(move || {
        let ids = m.tokenize(&[text], true)?;
        m.embed_ids(ids, false)
    })
    .await?;
    Ok(Json(
        json!({"embedding": out.vectors.into_iter().next().unwrap_or_default()}),
    ))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OpenAiRequest {
    model: Option<String>,
    input: Option<Value>,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
    #[allow(dead_code)]
    user: Option<String>,
}

/// OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of
/// those lists (ids of this model's vocabulary).
enum OpenAiInput {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

fn openai_input(v: Option<Value>) -> Result<OpenAiInput, ApiError> {
    let bad = || ApiError::bad_request("input must be a string, a list of strings, or token ids");
    let id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)
    };
    match v {
        None | Some(Value::Null) => Err(ApiError::bad_request("input is required")),
        Some(Value::String(s)) => Ok(OpenAiInput::Texts(vec![s])),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError::bad_request("input must not be empty"))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Ok(OpenAiInput::Texts(
            a.into_iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect(),
        )),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => Ok(OpenAiInput::Ids(vec![a
            .iter()
            .map(id)
            .collect::<Result<_, _>>()?])),
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => Ok(OpenAiInput::Ids(
            a.iter()
                .map(|seq| seq.as_array().ok_or_else(bad)?.iter().map(id).collect())
                .collect::<Result<_, _>>()?,
        )),
        Some(_) => Err(bad()),
    }
}

async fn openai_embeddings(State(st): S, body: Bytes) -> Result<Response, OpenAiError> {
    let req: OpenAiRequest = parse_body(&body)?;
    let input = openai_input(req.input)?;
    super::limits::check_inputs(match &input {
        OpenAiInput::Texts(t) => t.len(),
        OpenAiInput::Ids(i) => i.len(),
    })?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format '{other}' is not one of float, base64"
            ))
            .into())
        }
    };
    let (name, model) = embedder(&st, req.model.as_deref()).await?;
    let full = model.dims;
    let m = model.clone();
    let Embedded { vectors, tokens } = run(move || match input {
        OpenAiInput::Texts(t) => m.embed(&t, true),
        OpenAiInput::Ids(ids) => m.embed_ids(ids, true),
    })
    .await?;
    let vectors = shorten(vectors, req.dimensions, full)?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "embedding": embedding, "index": i})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// Standard base64 with padding (what OpenAI's clients decode into little-endian f32s).
fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_the_standard_alphabet_pads_it() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(&[0xff, 0xfe, 0xfd, 0x00]), "//79AA==");
    }

    #[test]
    fn dimensions_cut_and_renormalise() {
        let v = shorten(vec![vec![3.0, 4.0, 12.0]], Some(2), 3).unwrap();
        assert_eq!(v, vec![vec![0.6, 0.8]]);
        assert!(shorten(vec![vec![1.0]], Some(0), 1).is_err());
        assert!(shorten(vec![vec![1.0]], Some(2), 1).is_err());
    }
}
