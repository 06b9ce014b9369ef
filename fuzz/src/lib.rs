//! What the fuzz targets share: the real models' files in the hf-hub cache, their
//! tokenizer and chat templates, loaded once per fuzzing process.

use duet::model::tokenizer::TextCodec;
use duet::model::GgufFile;
use std::path::PathBuf;
use std::sync::OnceLock;

pub const SMALL: &str = "qwen2.5-coder:0.5b";
pub const LARGE: &str = "qwen2.5-coder:1.5b";

/// The repository's root (the fuzz crate lives in `fuzz/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ has a parent")
        .to_path_buf()
}

/// A real model's GGUF in the hf-hub cache (`scripts/fetch-models` puts it there).
pub fn weights(name: &str) -> PathBuf {
    let cfg = duet::config::Config::load(Some(&repo_root().join("models.toml")))
        .unwrap_or_else(|e| panic!("models.toml: {e}"));
    let spec = &cfg.models[name];
    duet::hub::resolve(&cfg, name, spec).unwrap_or_else(|e| panic!("{e}"))
}

/// The real 0.5B model's header.
pub fn small_gguf() -> &'static GgufFile {
    static F: OnceLock<GgufFile> = OnceLock::new();
    F.get_or_init(|| GgufFile::open(&weights(SMALL)).unwrap_or_else(|e| panic!("{e}")))
}

/// The real tokenizer (Qwen2.5-Coder's, from the 0.5B GGUF).
pub fn codec() -> &'static TextCodec {
    static C: OnceLock<TextCodec> = OnceLock::new();
    C.get_or_init(|| TextCodec::load(small_gguf()).unwrap_or_else(|e| panic!("{e}")))
}

/// The chat templates duet renders: the 0.5B's and 1.5B's (they differ), and ChatML.
pub fn templates() -> &'static [duet::model::template::ChatTemplate] {
    static T: OnceLock<Vec<duet::model::template::ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let mut sources: Vec<String> = [SMALL, LARGE]
            .iter()
            .map(|name| {
                let f = GgufFile::open(&weights(name)).unwrap_or_else(|e| panic!("{e}"));
                f.info()
                    .unwrap_or_else(|e| panic!("{e}"))
                    .chat_template
                    .expect("the real models have a chat template")
            })
            .collect();
        sources.push(duet::model::template::CHATML.to_string());
        sources
            .iter()
            .map(|s| duet::model::template::ChatTemplate::new(s).expect("a real template"))
            .collect()
    })
}

/// Bytes as text: valid UTF-8 as it is, anything else with replacement characters (the
/// API only ever hands the parsers `String`s).
pub fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}
