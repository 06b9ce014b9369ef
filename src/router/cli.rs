//! `duet classify`: the router's decision for one prompt, its score on a labelled JSONL
//! file (`--eval`), or the learned head's features of each line of one
//! (`--dump-features`, what scripts/train-router trains on).

use super::classifier::{Classifier, DecidedBy, Decision, EmbedderSource, Request};
use super::learned::{self, Head};
use crate::config::{Config, Tier};
use crate::model::embed::Embedder;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Options {
    pub prompt: Option<String>,
    pub eval: Option<PathBuf>,
    pub dump_features: Option<PathBuf>,
    pub json: bool,
    pub system: Option<String>,
    pub turns: usize,
    pub num_predict: Option<i32>,
    /// The keyword rules alone, as when the embedding model is unavailable.
    pub rules: bool,
    /// Word pieces embedded by `dump_features` (default: the head's).
    pub max_tokens: Option<usize>,
}

/// The router's head: `[routing] head` of models.toml (relative to it), else the
/// built-in one.
pub fn head(config: &Config) -> Result<Head> {
    Ok(match &config.routing.head {
        Some(p) => Head::load(&config.base_dir.join(p))?,
        None => Head::builtin(),
    })
}

/// Loads the embedding model the router reads (`[routing] embedding`) on the CPU.
pub fn load_embedder(config: &Config) -> Result<Embedder, String> {
    let name = &config.routing.embedding;
    let spec = config
        .embeddings
        .get(name)
        .ok_or_else(|| format!("embedding model '{name}' is not configured under [embeddings]"))?;
    let dir = crate::hub::resolve_embedding(config, name, spec).map_err(|e| e.to_string())?;
    Embedder::load(&dir, &candle_core::Device::Cpu).map_err(|e| e.to_string())
}

/// The classifier as the server builds it, with its embedding model loaded here (or the
/// rules alone, with the reason, when it cannot be).
pub fn classifier(config: &Config, rules_only: bool) -> Result<Classifier> {
    let c = Classifier::new(config.routing.clone())?;
    if rules_only {
        return Ok(c);
    }
    let source: EmbedderSource = match load_embedder(config) {
        Ok(e) => {
            let e = Arc::new(e);
            Arc::new(move || Ok(e.clone()))
        }
        Err(why) => Arc::new(move || Err(why.clone())),
    };
    Ok(c.with_learned(head(config)?, source))
}

/// One line of a labelled JSONL file: `prompt` and `tier` (or `label`), optionally
/// `system`, `turns`, `num_predict`, or `messages` (a chat: the last user message is
/// the prompt, the first system message the system prompt).
pub struct Labelled {
    pub prompt: String,
    pub tier: Option<Tier>,
    pub system: Option<String>,
    pub turns: usize,
    pub num_predict: Option<i32>,
}

impl Labelled {
    pub fn request(&self) -> Request<'_> {
        Request {
            prompt: &self.prompt,
            system: self.system.as_deref(),
            turns: self.turns,
            num_predict: self.num_predict,
        }
    }
}

pub fn parse_tier(s: &str) -> Option<Tier> {
    serde_json::from_value(serde_json::Value::String(s.trim().to_lowercase())).ok()
}

/// Reads a labelled JSONL file; blank lines are skipped, anything else that is not a
/// line as described is an error naming the file and line.
pub fn read_labelled(path: &Path, need_tier: bool) -> Result<Vec<Labelled>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let str_of = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (prompt, mut system, mut turns) = if let Some(msgs) = v.get("messages") {
            let msgs = msgs
                .as_array()
                .with_context(|| format!("{}: \"messages\" must be a list", at()))?;
            let pair = |m: &serde_json::Value| {
                (
                    m["role"].as_str().unwrap_or_default().to_string(),
                    m["content"].as_str().unwrap_or_default().to_string(),
                )
            };
            let msgs: Vec<(String, String)> = msgs.iter().map(pair).collect();
            let prompt = msgs
                .iter()
                .rev()
                .find(|(r, _)| r == "user")
                .map(|m| m.1.clone());
            let system = msgs
                .iter()
                .find(|(r, _)| r == "system")
                .map(|m| m.1.clone());
            (prompt, system, msgs.len())
        } else {
            (str_of("prompt"), None, 1)
        };
        let prompt =
            prompt.with_context(|| format!("{}: no \"prompt\" (or user message)", at()))?;
        if let Some(s) = str_of("system") {
            system = Some(s);
        }
        if let Some(t) = v.get("turns") {
            turns = t
                .as_u64()
                .filter(|&t| t >= 1)
                .with_context(|| format!("{}: \"turns\" must be a positive integer", at()))?
                as usize;
        }
        let num_predict = match v.get("num_predict") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_i64()
                    .with_context(|| format!("{}: \"num_predict\" must be an integer", at()))?
                    .clamp(i32::MIN as i64, i32::MAX as i64) as i32,
            ),
        };
        let label = str_of("tier").or_else(|| str_of("label"));
        let tier = match &label {
            Some(l) => Some(parse_tier(l).with_context(|| {
                format!("{}: tier \"{l}\" must be SIMPLE, MODERATE or COMPLEX", at())
            })?),
            None if need_tier => bail!("{}: no \"tier\"", at()),
            None => None,
        };
        out.push(Labelled {
            prompt,
            tier,
            system,
            turns,
            num_predict,
        });
    }
    Ok(out)
}

/// `duet classify`. `model_for` names the model a tier goes to in the layout.
pub fn run(config: &Config, opts: Options, model_for: impl Fn(Tier) -> String) -> Result<()> {
    if let Some(path) = &opts.dump_features {
        return dump_features(config, path, opts.max_tokens);
    }
    let classifier = classifier(config, opts.rules)?;
    if let Some(path) = &opts.eval {
        return eval(&classifier, path, opts.json);
    }
    let prompt = opts.prompt.unwrap_or_default();
    let d = classifier.classify(&Request {
        prompt: &prompt,
        system: opts.system.as_deref(),
        turns: opts.turns,
        num_predict: opts.num_predict,
    });
    let model = model_for(d.tier);
    if opts.json {
        let mut v = serde_json::to_value(&d)?;
        v["tier"] = d.tier.to_string().into();
        v["model"] = model.into();
        println!("{v}");
        return Ok(());
    }
    println!("tier:       {}", d.tier);
    println!("confidence: {:.2}", d.confidence);
    println!("model:      {model}");
    println!("decided by: {}", by_name(d.by));
    if let Some(p) = d.probabilities {
        println!(
            "p:          SIMPLE {:.2}  MODERATE {:.2}  COMPLEX {:.2}",
            p[0], p[1], p[2]
        );
    } else {
        println!(
            "scores:     SIMPLE {:.2}  MODERATE {:.2}  COMPLEX {:.2}",
            d.scores[0], d.scores[1], d.scores[2]
        );
    }
    println!("time:       {} µs", d.micros);
    println!(
        "{}",
        if d.by == DecidedBy::Learned {
            "top signals:"
        } else {
            "reasons:"
        }
    );
    for r in &d.reasons {
        println!("  - {r}");
    }
    Ok(())
}

fn by_name(b: DecidedBy) -> &'static str {
    match b {
        DecidedBy::Learned => "learned classifier",
        DecidedBy::Rules => "keyword rules",
        DecidedBy::Override => "override rule",
        DecidedBy::Client => "the client (X-Duet-Tier)",
    }
}

fn eval(classifier: &Classifier, path: &Path, json: bool) -> Result<()> {
    let rows = read_labelled(path, true)?;
    let tiers = [Tier::Simple, Tier::Moderate, Tier::Complex];
    let mut matrix = [[0usize; 3]; 3];
    let mut misses = Vec::new();
    let mut by = std::collections::BTreeMap::<&str, usize>::new();
    let mut micros = Vec::new();
    for r in &rows {
        let d: Decision = classifier.classify(&r.request());
        let want = r.tier.expect("read with tiers");
        let (wi, gi) = (learned::tier_index(want), learned::tier_index(d.tier));
        matrix[wi][gi] += 1;
        *by.entry(by_name(d.by)).or_default() += 1;
        micros.push(d.micros);
        if wi != gi {
            misses.push(format!(
                "  {want} → {} ({:.2}): {}",
                d.tier,
                d.confidence,
                r.prompt.lines().next().unwrap_or_default()
            ));
        }
    }
    let total: usize = matrix.iter().flatten().sum();
    let right: usize = (0..3).map(|i| matrix[i][i]).sum();
    let accuracy = right as f64 / total.max(1) as f64;
    micros.sort_unstable();
    let median = micros.get(micros.len() / 2).copied().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"total": total, "correct": right, "accuracy": accuracy,
            "decided_by": by, "median_micros": median,
            "confusion": {"rows": "expected", "columns": "predicted", "order": ["SIMPLE", "MODERATE", "COMPLEX"], "matrix": matrix}})
        );
        return Ok(());
    }
    println!("accuracy: {right}/{total} = {:.1}%", accuracy * 100.0);
    let by: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("decided by: {}; median time {median} µs", by.join(", "));
    println!();
    println!(
        "{:<20} {:>8} {:>8} {:>8}",
        "expected \\ predicted", "SIMPLE", "MODERATE", "COMPLEX"
    );
    for (i, t) in tiers.iter().enumerate() {
        println!(
            "{:<20} {:>8} {:>8} {:>8}",
            t.to_string(),
            matrix[i][0],
            matrix[i][1],
            matrix[i][2]
        );
    }
    if !misses.is_empty() {
        println!("\nmisclassified:\n{}", misses.join("\n"));
    }
    Ok(())
}

/// One JSON line per input line: its tier (when labelled) and the head's features.
fn dump_features(config: &Config, path: &Path, max_tokens: Option<usize>) -> Result<()> {
    let rows = read_labelled(path, false)?;
    let embedder = load_embedder(config).map_err(|e| anyhow::anyhow!(e))?;
    let max_tokens = match max_tokens {
        Some(n) if n < 2 => bail!("--max-tokens must be at least 2"),
        Some(n) => n,
        None => head(config)?.max_tokens,
    };
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in &rows {
        let req = r.request();
        let parts = super::classifier::split_instruction(req.prompt);
        let f = learned::features_of(&embedder, &parts, &req, max_tokens)?;
        let v = serde_json::json!({
            "tier": r.tier.map(|t| t.to_string()),
            "instruction": parts.instruction.trim(),
            "embedding": f.embedding,
            "signals": f.signals,
        });
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    Ok(())
}
