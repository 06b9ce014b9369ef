//! Finding weights on disk: the standard hf-hub cache (read offline, so HF_HUB_OFFLINE=1
//! changes nothing) or an explicit local path. Fetching is `scripts/fetch-models`' job.

use crate::config::{Config, ModelSpec};
use hf_hub::{Cache, Repo};
use std::path::PathBuf;

pub const FETCH_COMMAND: &str = "scripts/fetch-models";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "weights of model '{model}' not found: file '{file}' of repo '{repo}' is not in the \
         hf-hub cache at {cache}. Fetch it with `{FETCH_COMMAND}` (or `huggingface-cli download \
         {repo} {file}` where the hub is reachable), or set `path` for this model in models.toml"
    )]
    NotCached {
        model: String,
        repo: String,
        file: String,
        cache: String,
    },
    #[error("weights of model '{model}' not found: {path} does not exist (the `path` set in models.toml)")]
    MissingPath { model: String, path: String },
    #[error(
        "embedding model '{model}' not found: {what}. Fetch it with `{FETCH_COMMAND} --only \
         {model}` (or `huggingface-cli download {repo}` where the hub is reachable), or set \
         `path` for it under [embeddings] in models.toml"
    )]
    FolderMissing {
        model: String,
        repo: String,
        what: String,
    },
}

/// The files of an embedding model's folder that duet reads.
pub const EMBEDDING_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Resolves an embedding model's folder (the hf-hub snapshot, or `path`) without
/// touching the network; every file of [`EMBEDDING_FILES`] must be there.
pub fn resolve_embedding(
    cfg: &Config,
    model: &str,
    spec: &crate::config::EmbeddingSpec,
) -> Result<PathBuf, HubError> {
    let repo = spec.repo.clone().unwrap_or_default();
    let missing = |what: String| HubError::FolderMissing {
        model: model.to_string(),
        repo: repo.clone(),
        what,
    };
    let dir = match &spec.path {
        Some(path) if path.is_absolute() => path.clone(),
        Some(path) => cfg.base_dir.join(path),
        None => {
            let cache = cache();
            match cache
                .repo(Repo::model(repo.clone()))
                .get(EMBEDDING_FILES[0])
            {
                Some(p) => p.parent().map(PathBuf::from).unwrap_or_default(),
                None => {
                    return Err(missing(format!(
                        "repo '{repo}' is not in the hf-hub cache at {}",
                        cache.path().display()
                    )))
                }
            }
        }
    };
    for f in EMBEDDING_FILES {
        if !dir.join(f).is_file() {
            return Err(missing(format!("{} has no {f}", dir.display())));
        }
    }
    Ok(dir)
}

/// The hub cache directory: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

/// Resolves a model's GGUF file without touching the network.
pub fn resolve(cfg: &Config, model: &str, spec: &ModelSpec) -> Result<PathBuf, HubError> {
    if let Some(path) = &spec.path {
        let path = if path.is_absolute() {
            path.clone()
        } else {
            cfg.base_dir.join(path)
        };
        return if path.is_file() {
            Ok(path)
        } else {
            Err(HubError::MissingPath {
                model: model.to_string(),
                path: path.display().to_string(),
            })
        };
    }
    // validate() guarantees repo and file when path is absent.
    let repo = spec.repo.clone().unwrap_or_default();
    let file = spec.file.clone().unwrap_or_default();
    let cache = cache();
    match cache.repo(Repo::model(repo.clone())).get(&file) {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(HubError::NotCached {
            model: model.to_string(),
            repo,
            file,
            cache: cache.path().display().to_string(),
        }),
    }
}
