//! Managing models as Ollama's API does: `/api/pull` (fetch the weights into the hf-hub
//! cache, with NDJSON progress), `/api/delete` (remove them, or a copy), `/api/copy` (a
//! new name for a model, kept across restarts).

use super::stream::{body_response, ndjson_line};
use super::{parse_body, ApiError, AppState};
use crate::fetch::{Pull, PullError};
use crate::model::GgufFile;
use crate::serving::worker::SlotFile;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

type S = State<Arc<AppState>>;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/pull", post(pull))
        .route("/api/delete", delete(delete_model))
        .route("/api/copy", post(copy))
}

/// Names made with /api/copy (destination → configured model), saved in
/// `copies.json` of duet's data folder (DUET_DATA_DIR, else $XDG_DATA_HOME/duet, else
/// ~/.local/share/duet) so they outlive the server.
pub struct Copies {
    path: Option<PathBuf>,
    map: RwLock<BTreeMap<String, String>>,
}

impl Copies {
    /// The copies saved in the data folder (none when it has no copies.json yet).
    pub fn load() -> Self {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = env("DUET_DATA_DIR")
            .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("duet")))
            .or_else(|| env("HOME").map(|h| h.join(".local/share/duet")));
        let path = dir.map(|d| d.join("copies.json"));
        let map = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| match serde_json::from_str(&s) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "copies.json is not valid: ignored");
                    None
                }
            })
            .unwrap_or_default();
        Self {
            path,
            map: RwLock::new(map),
        }
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every copy, destination → model.
    pub fn all(&self) -> Vec<(String, String)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(a, b)| (a.clone(), b.clone())).collect()
    }

    fn update(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, String>) -> bool,
    ) -> Result<bool, ApiError> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if !f(&mut map) {
            return Ok(false);
        }
        if let Some(path) = &self.path {
            let save = || -> std::io::Result<()> {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, serde_json::to_vec_pretty(&*map)?)?;
                std::fs::rename(&tmp, path)
            };
            save().map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot save {}: {e}", path.display()),
                )
            })?;
        }
        Ok(true)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NameRequest {
    model: Option<String>,
    name: Option<String>,
    stream: Option<bool>,
    #[allow(dead_code)]
    insecure: bool,
}

impl NameRequest {
    fn name(&self) -> Result<String, ApiError> {
        self.model
            .as_deref()
            .or(self.name.as_deref())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request("model is required"))
    }
}

fn pull_error(e: PullError) -> ApiError {
    match e {
        PullError::LocalFile { .. } => ApiError::bad_request(e.to_string()),
        PullError::NotConfigured { .. } => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
    }
}

/// After a successful fetch: the model's slot gets its file and loads on demand.
fn register(st: &AppState, pull: &Pull) -> anyhow::Result<()> {
    match pull {
        Pull::Gguf { model, .. } => {
            let spec = &st.config.models[model];
            let path = crate::hub::resolve(&st.config, model, spec)?;
            let info = GgufFile::open(&path)?.info()?;
            if let Some(slot) = st.slot(model) {
                slot.set_file(SlotFile::new(path, info));
            }
        }
        Pull::Folder { model } => {
            crate::hub::resolve_embedding(&st.config, model, &st.config.embeddings[model])?;
            if st.embedder(model).is_none() {
                tracing::warn!(model = %model, "fetched; it is served after duet serve restarts");
            }
        }
    }
    Ok(())
}

async fn pull(State(st): S, body: Bytes) -> Result<Response, ApiError> {
    let req: NameRequest = parse_body(&body)?;
    let name = req.name()?;
    let what = Pull::of(&st.config, &st.canonical(&name)).map_err(pull_error)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(64);
    let state = st.clone();
    tokio::task::spawn_blocking(move || {
        let fetched = crate::fetch::run(what.source(), |v| {
            let _ = tx.blocking_send(v);
        });
        match fetched.and_then(|_| register(&state, &what)) {
            Ok(()) => {
                let _ = tx.blocking_send(json!({"status": "writing manifest"}));
                let _ = tx.blocking_send(json!({"status": "success"}));
            }
            Err(e) => {
                tracing::warn!(model = %name, error = %e, "pull failed");
                let _ = tx.blocking_send(json!({"error": format!("{e:#}")}));
            }
        }
    });
    if req.stream.unwrap_or(true) {
        let lines = futures_util::stream::unfold(rx, |mut rx| async move {
            let v = rx.recv().await?;
            Some((ndjson_line(&v), rx))
        });
        return Ok(body_response("application/x-ndjson", lines));
    }
    let mut last = json!({"error": "the pull ended without a result"});
    while let Some(v) = rx.recv().await {
        last = v;
    }
    match last["error"].as_str() {
        Some(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
        None => Ok(Json(json!({"status": "success"})).into_response()),
    }
}

async fn delete_model(State(st): S, body: Bytes) -> Result<Response, ApiError> {
    let req: NameRequest = parse_body(&body)?;
    let name = req.name()?;
    let bare = name.strip_suffix(":latest").unwrap_or(&name).to_string();
    if st.copies.update(|m| m.remove(&bare).is_some())? {
        return Ok(StatusCode::OK.into_response());
    }
    let canonical = st.canonical(&name);
    if st.embedder(&canonical).is_some() {
        return Err(ApiError::bad_request(format!(
            "'{name}' is an embedding model: duet keeps it for the life of the server and does not delete it"
        )));
    }
    let slot = st
        .slot(&canonical)
        .filter(|s| !s.is_absent())
        .ok_or_else(|| ApiError::not_found(&name))?;
    if let Some(p) = st
        .config
        .models
        .get(&canonical)
        .and_then(|m| m.path.as_ref())
    {
        return Err(pull_error(PullError::LocalFile {
            name: name.clone(),
            path: p.display().to_string(),
        }));
    }
    let file = slot.file().ok_or_else(|| ApiError::not_found(&name))?;
    // The snapshot entry is a link to the blob named by the file's sha256: both go.
    let cache = crate::hub::cache().path().clone();
    let blob = std::fs::canonicalize(&file.path).ok();
    slot.remove_file("deleted: `duet pull` fetches it again");
    let mut removed = Vec::new();
    for p in [Some(file.path.clone()), blob].into_iter().flatten() {
        if p.starts_with(&cache) && std::fs::remove_file(&p).is_ok() {
            removed.push(p.display().to_string());
        }
    }
    tracing::info!(model = %canonical, ?removed, "deleted");
    Ok(StatusCode::OK.into_response())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CopyRequest {
    source: String,
    destination: String,
}

async fn copy(State(st): S, body: Bytes) -> Result<Response, ApiError> {
    let req: CopyRequest = parse_body(&body)?;
    let (source, dest) = (req.source.trim(), req.destination.trim());
    if source.is_empty() || dest.is_empty() {
        return Err(ApiError::bad_request("source and destination are required"));
    }
    let dest = dest.strip_suffix(":latest").unwrap_or(dest).to_string();
    let canonical = st.canonical(source);
    let exists =
        st.slot(&canonical).is_some_and(|s| !s.is_absent()) || st.embedder(&canonical).is_some();
    if !exists {
        return Err(ApiError::not_found(source));
    }
    let taken = st.config.models.contains_key(&dest)
        || st.config.embeddings.contains_key(&dest)
        || st.aliases.iter().any(|(a, _)| *a == dest)
        || st.routed_names.contains(&dest);
    if taken {
        return Err(ApiError::bad_request(format!(
            "'{dest}' already names a model of models.toml (or the router)"
        )));
    }
    if dest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::bad_request(format!(
            "'{dest}' is not a valid model name"
        )));
    }
    st.copies.update(|m| {
        m.insert(dest.clone(), canonical.clone());
        true
    })?;
    Ok(StatusCode::OK.into_response())
}
