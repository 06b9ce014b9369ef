//! Shared helpers for the integration tests: the real models, loaded once per test binary.
#![allow(dead_code)]

use duet::config::{Config, DeviceSpec};
use duet::model::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

pub const SMALL: &str = "qwen2.5-coder:0.5b";
pub const LARGE: &str = "qwen2.5-coder:1.5b";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn vectors(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/vectors").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn config() -> Config {
    Config::load(Some(&repo_root().join("models.toml"))).expect("models.toml")
}

/// Path of a model's GGUF in the hf-hub cache; fails with the fetch command if absent.
pub fn weights(name: &str) -> PathBuf {
    let cfg = config();
    let spec = &cfg.models[name];
    duet::hub::resolve(&cfg, name, spec).unwrap_or_else(|e| panic!("{e}"))
}

pub const EMBED: &str = "all-minilm";

/// Folder of the embedding model in the hf-hub cache; fails with the fetch command if absent.
pub fn embedding_dir() -> PathBuf {
    let cfg = config();
    duet::hub::resolve_embedding(&cfg, EMBED, &cfg.embeddings[EMBED])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn load(name: &str) -> Model {
    Model::load(name, &weights(name), DeviceSpec::Cpu(0)).unwrap_or_else(|e| panic!("{e}"))
}

pub fn small() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(SMALL))
}

pub fn large() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(LARGE))
}

/// Polls `pred` until it holds, failing after `secs` seconds with what was awaited.
pub fn wait_until(what: &str, secs: u64, mut pred: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !pred() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A JSON array of strings, as string slices.
pub fn strs(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A models.toml with only the 0.5B model, on cpu:0.
pub fn small_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[models.\"{SMALL}\"]\npath = \"{}\"\n[[layouts.one.place]]\nmodel = \"{SMALL}\"\ndevice = \"cpu:0\"\ntiers = [\"simple\", \"moderate\", \"complex\"]\n",
        weights(SMALL).display()
    );
    std::fs::write(dir.path().join("models.toml"), toml).unwrap();
    dir
}
