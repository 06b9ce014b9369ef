//! The decision log: one JSON line per routed request (`[routing] log` in models.toml
//! or DUET_ROUTING_LOG), so that routing can be audited and learned from. A line holds a
//! hash of the prompt (never the prompt), the head's features, the tier, who decided it
//! (the head, the rules, an override rule, or the client's `X-Duet-Tier`, which is then
//! the line's `label`), the confidence, the model, and the time the classification took.
//! A draft (confidence-driven escalation) adds a second line with the same `id`: the
//! draft's signal, its time, and whether the request was escalated.
//! `scripts/train-router --log FILE` trains on the labelled lines.

use super::classifier::{DecidedBy, Decision, Request};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct DecisionLog {
    pub path: PathBuf,
    file: Mutex<std::fs::File>,
    next: AtomicU64,
}

/// FNV-1a (64 bits) of the request's text: the same prompt gives the same hash from one
/// run to the next, and the prompt itself is not stored.
pub fn prompt_hash(req: &Request) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in req
        .system
        .unwrap_or_default()
        .bytes()
        .chain([0u8])
        .chain(req.prompt.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl DecisionLog {
    /// Opens `path` for appending (created when absent).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            next: AtomicU64::new(0),
        })
    }

    fn write(&self, v: &serde_json::Value) {
        let mut line = v.to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(path = %self.path.display(), "cannot write the routing log: {e}");
        }
    }

    /// Logs a routing decision; returns its id (for a later draft line).
    pub fn decision(
        &self,
        req: &Request,
        d: &Decision,
        model: &str,
        fallback: bool,
        draft: Option<&str>,
    ) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let label = (d.by == DecidedBy::Client).then(|| d.tier.to_string());
        self.write(&json!({
            "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "id": id,
            "prompt_hash": prompt_hash(req),
            "tier": d.tier.to_string(),
            "label": label,
            "by": d.by,
            "confidence": d.confidence,
            "probabilities": d.probabilities,
            "model": model,
            "fallback": fallback,
            "draft_model": draft,
            "classify_us": d.micros,
            "turns": req.turns,
            "num_predict": req.num_predict,
            "features": d.features,
        }));
        id
    }

    /// Logs how a draft ended.
    pub fn draft(&self, id: u64, signal: Option<f32>, escalated: bool, draft_ms: u64) {
        self.write(&json!({
            "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "id": id,
            "event": "draft",
            "signal": signal,
            "escalated": escalated,
            "draft_ms": draft_ms,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tier;

    #[test]
    fn lines_hold_the_decision_and_not_the_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let log = DecisionLog::open(&path).unwrap();
        let req = Request {
            prompt: "secret prompt text",
            turns: 1,
            ..Default::default()
        };
        let mut d = Decision {
            tier: Tier::Complex,
            confidence: 0.7,
            reasons: vec![],
            scores: [0.0; 3],
            by: DecidedBy::Learned,
            probabilities: Some([0.1, 0.2, 0.7]),
            features: None,
            micros: 1234,
        };
        let id = log.decision(&req, &d, "big", false, None);
        d.force(Tier::Simple);
        log.decision(&req, &d, "small", false, None);
        log.draft(id, Some(-0.2), true, 50);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("secret"));
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["tier"], "COMPLEX");
        assert_eq!(lines[0]["label"], serde_json::Value::Null);
        assert_eq!(lines[0]["classify_us"], 1234);
        assert_eq!(lines[1]["label"], "SIMPLE");
        assert_eq!(lines[1]["by"], "client");
        assert_eq!(lines[0]["prompt_hash"], lines[1]["prompt_hash"]);
        assert_eq!(
            (lines[2]["id"].clone(), lines[2]["escalated"].clone()),
            (0.into(), true.into())
        );
    }
}
