//! The CLI's side of the Ollama API: `duet ps`, `duet stop` and the interactive
//! `duet run` talk to a server already running at OLLAMA_HOST, as `ollama` does.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::Duration;

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// The server OLLAMA_HOST (or DUET_HOST) names, default 127.0.0.1:11434.
    pub fn from_env() -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let host = env("DUET_HOST")
            .or_else(|| env("OLLAMA_HOST"))
            .unwrap_or_else(|| crate::serve::DEFAULT_HOST.to_string());
        let addr = crate::serve::parse_host(&host)?;
        let connect = if addr.ip().is_unspecified() {
            // A server listening on 0.0.0.0 answers on the loopback address.
            std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        } else {
            addr
        };
        Ok(Self {
            base: format!("http://{connect}"),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .build(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether a server answers (`GET /api/version`).
    pub fn is_up(&self) -> bool {
        self.agent
            .get(&format!("{}/api/version", self.base))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok()
    }

    /// Like [`is_up`](Self::is_up), with the error a user should see when it is not.
    pub fn require(&self) -> Result<()> {
        if !self.is_up() {
            bail!(
                "could not connect to a running duet server at {} (start one with `duet serve`, or set OLLAMA_HOST)",
                self.base
            );
        }
        Ok(())
    }

    fn post(&self, path: &str, body: &Value) -> Result<ureq::Response> {
        self.send("POST", path, body)
    }

    /// Sends JSON; an error status becomes the server's own `error` message.
    fn send(&self, method: &str, path: &str, body: &Value) -> Result<ureq::Response> {
        let url = format!("{}{path}", self.base);
        match self.agent.request(method, &url).send_json(body.clone()) {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let v: Value = r.into_json().unwrap_or_default();
                let msg = v["error"].as_str().unwrap_or("no message").to_string();
                bail!("{msg} (HTTP {code})")
            }
            Err(e) => Err(e).with_context(|| format!("{method} {url}")),
        }
    }

    pub fn ps(&self) -> Result<Vec<Value>> {
        let v: Value = self
            .agent
            .get(&format!("{}/api/ps", self.base))
            .call()
            .context("GET /api/ps")?
            .into_json()?;
        Ok(v["models"].as_array().cloned().unwrap_or_default())
    }

    /// Unloads a model now, as `ollama stop` does: an empty prompt with keep_alive 0.
    pub fn stop(&self, model: &str) -> Result<()> {
        self.post(
            "/api/generate",
            &json!({"model": model, "prompt": "", "keep_alive": 0}),
        )?;
        Ok(())
    }

    /// Streams a chat answer, calling `on_text` with each piece; returns the whole answer
    /// and the final chunk (counts and timings).
    pub fn chat(
        &self,
        model: &str,
        messages: &[Value],
        options: &Value,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<(String, Value)> {
        let r = self.post(
            "/api/chat",
            &json!({"model": model, "messages": messages, "options": options, "stream": true}),
        )?;
        let mut answer = String::new();
        for line in BufReader::new(r.into_reader()).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).context("a chat chunk")?;
            if let Some(e) = v["error"].as_str() {
                bail!("{e}");
            }
            if let Some(t) = v["message"]["content"].as_str() {
                answer.push_str(t);
                on_text(t)?;
            }
            if v["done"] == true {
                return Ok((answer, v));
            }
        }
        bail!("the server closed the stream before the answer was done")
    }
}

impl Client {
    /// Streams a pull's status lines to `on_status`; fails with the server's error.
    pub fn pull(&self, model: &str, mut on_status: impl FnMut(&Value)) -> Result<()> {
        let r = self.post("/api/pull", &json!({"model": model, "stream": true}))?;
        for line in BufReader::new(r.into_reader()).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).context("a pull status line")?;
            if let Some(e) = v["error"].as_str() {
                bail!("{e}");
            }
            on_status(&v);
            if v["status"] == "success" {
                return Ok(());
            }
        }
        bail!("the server closed the pull before it succeeded")
    }

    pub fn delete(&self, model: &str) -> Result<()> {
        self.send("DELETE", "/api/delete", &json!({"model": model}))?;
        Ok(())
    }

    pub fn copy(&self, source: &str, destination: &str) -> Result<()> {
        self.post(
            "/api/copy",
            &json!({"source": source, "destination": destination}),
        )?;
        Ok(())
    }
}

/// Shows pull status lines as `ollama pull` does: a progress bar per file, the other
/// statuses as lines.
pub struct PullDisplay {
    bar: Option<(String, indicatif::ProgressBar)>,
    last: String,
}

impl Default for PullDisplay {
    fn default() -> Self {
        Self::new()
    }
}

impl PullDisplay {
    pub fn new() -> Self {
        Self {
            bar: None,
            last: String::new(),
        }
    }

    pub fn show(&mut self, v: &Value) {
        let status = v["status"].as_str().unwrap_or_default().to_string();
        match (v["total"].as_u64(), v["completed"].as_u64()) {
            (Some(total), Some(done)) => {
                if self.bar.as_ref().map(|(s, _)| s != &status).unwrap_or(true) {
                    if let Some((_, b)) = self.bar.take() {
                        b.finish();
                    }
                    let b = indicatif::ProgressBar::new(total);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} {percent:>3}% ▕{bar:40}▏ {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b.set_message(status.clone());
                    self.bar = Some((status.clone(), b));
                }
                if let Some((_, b)) = &self.bar {
                    b.set_position(done);
                }
            }
            _ if status != self.last => {
                if let Some((_, b)) = self.bar.take() {
                    b.finish();
                }
                eprintln!("{status}");
            }
            _ => {}
        }
        self.last = status;
    }
}

/// `duet ps` as `ollama ps` prints it.
pub fn print_ps(models: &[Value]) {
    println!(
        "{:<28} {:<14} {:>9}  {:<10} {:>8}  UNTIL",
        "NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT"
    );
    for m in models {
        let id: String = m["digest"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        let size = m["size"].as_u64().unwrap_or(0);
        let until = m["expires_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| {
                let left = t.with_timezone(&chrono::Utc) - chrono::Utc::now();
                if left.num_days() > 365 * 10 {
                    "Forever".to_string()
                } else if left.num_seconds() < 60 {
                    format!("{} seconds from now", left.num_seconds().max(0))
                } else if left.num_minutes() < 120 {
                    format!("{} minutes from now", left.num_minutes())
                } else {
                    format!("{} hours from now", left.num_hours())
                }
            })
            .unwrap_or_default();
        println!(
            "{:<28} {:<14} {:>9}  {:<10} {:>8}  {}",
            m["name"].as_str().unwrap_or_default(),
            id,
            format!("{:.1} GB", size as f64 / 1e9),
            m["device"].as_str().unwrap_or("cpu"),
            m["context_length"].as_u64().unwrap_or(0),
            until
        );
    }
}
