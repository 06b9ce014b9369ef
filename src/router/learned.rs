//! The learned tier classifier: a multinomial logistic regression (the *head*) over
//! static all-minilm embeddings of what is asked plus a few request signals.
//!
//! - **Embeddings** ([`VIEWS`]): the instruction of the request (its prose, with attached
//!   code set apart by [`split_instruction`]: code size is a signal of its own) and its
//!   first clause (the ask itself, up to the first sentence end), each the mean of the
//!   embedding model's *input* word-piece vectors (unit length each; the mean scaled to
//!   unit length), concatenated. No encoder pass: the all-minilm forward pass cost
//!   11 ms for a short ask and 111 ms for 128 word pieces on one core, where this look-up
//!   costs microseconds. A long instruction is cut to the head's `max_tokens` word
//!   pieces, keeping its beginning and its end (where the ask usually is), and its text
//!   to [`BYTES_PER_TOKEN`] bytes per word piece before tokenizing, which bounds the time
//!   per request whatever the prompt's size.
//! - **Signals** ([`SIGNALS`]): attached code size (lines, and `inline code` spans),
//!   instruction length, chat turns, a system prompt, the client's num_predict.
//!   Standardised with the training set's mean and scale stored in the head, and clipped
//!   to ±3.
//!
//! The head is a JSON file written by `scripts/train-router` (src/router/head.json is
//! built into the binary; `[routing] head` names another). Its probabilities give the
//! tier (the most probable) and the confidence (that probability).

use super::classifier::{split_instruction, Parts, Request};
use crate::config::Tier;
use crate::model::embed::{EmbedError, Embedder};
use serde::{Deserialize, Serialize};

/// The head built into the binary.
pub const BUILTIN_HEAD: &str = include_str!("head.json");

/// The texts embedded, in the order of the feature vector.
pub const VIEWS: [&str; 2] = ["instruction", "first clause"];

/// Standardised signals are clipped to this many standard deviations.
const CLIP: f32 = 3.0;

/// Word pieces of the first clause that are embedded.
const CLAUSE_TOKENS: usize = 32;

/// Bytes of text kept per word piece embedded, at each end of a long instruction, before
/// it is tokenized (a word piece is 1 to ~10 bytes of English; the cut to `max_tokens`
/// pieces follows).
pub const BYTES_PER_TOKEN: usize = 16;

/// The head layout this duet computes: 2 = static (input) embeddings.
pub const HEAD_VERSION: u32 = 2;

/// Names of the request signals, in the order of the feature vector (after the
/// embedding). The head file lists the ones it was trained with; they must match.
pub const SIGNALS: [&str; 8] = [
    "code_lines",
    "has_code",
    "inline_code",
    "instruction_words",
    "turns",
    "system_prompt",
    "num_predict_set",
    "num_predict",
];

/// The trained head: `logits = weights · [embedding, (signals - mean) / scale] + bias`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub version: u32,
    /// The embedding model it was trained on (hf-hub repo, for the record).
    pub embedding_model: String,
    /// Length of the embeddings of all [`VIEWS`] together.
    pub embedding_dims: usize,
    /// Word pieces of the instruction that are averaged.
    pub max_tokens: usize,
    /// Class order of `weights` and `bias`: SIMPLE, MODERATE, COMPLEX.
    pub classes: Vec<String>,
    pub signals: Vec<String>,
    pub signal_mean: Vec<f32>,
    pub signal_scale: Vec<f32>,
    /// One row per class, `embedding_dims + signals.len()` long.
    pub weights: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    /// How it was trained (corpus, size, regularisation, cross-validated accuracy).
    #[serde(default)]
    pub training: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
#[error("router head {origin}: {message}")]
pub struct HeadError {
    pub origin: String,
    pub message: String,
}

impl Head {
    pub fn parse(text: &str, origin: &str) -> Result<Self, HeadError> {
        let err = |message: String| HeadError {
            origin: origin.to_string(),
            message,
        };
        let h: Head = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        if h.version != HEAD_VERSION {
            return Err(err(format!(
                "head version {} was trained on other features than this duet's (version {HEAD_VERSION}, static embeddings); retrain with scripts/train-router",
                h.version
            )));
        }
        let want: Vec<String> = ["SIMPLE", "MODERATE", "COMPLEX"].map(String::from).into();
        if h.classes != want {
            return Err(err(format!(
                "classes must be {want:?}, not {:?}",
                h.classes
            )));
        }
        if h.signals != SIGNALS {
            return Err(err(format!(
                "trained on signals {:?}; this duet computes {SIGNALS:?} (retrain with scripts/train-router)",
                h.signals
            )));
        }
        let n = h.embedding_dims + SIGNALS.len();
        if h.weights.len() != 3
            || h.weights.iter().any(|w| w.len() != n)
            || h.bias.len() != 3
            || h.signal_mean.len() != SIGNALS.len()
            || h.signal_scale.len() != SIGNALS.len()
        {
            return Err(err(format!(
                "weights must be 3 rows of {n}, bias 3, signal_mean and signal_scale {}",
                SIGNALS.len()
            )));
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !h.weights.iter().all(|w| finite(w))
            || !finite(&h.bias)
            || !finite(&h.signal_mean)
            || !h.signal_scale.iter().all(|s| s.is_finite() && *s > 0.0)
        {
            return Err(err(
                "weights, bias, mean and scale must be finite (scale positive)".into(),
            ));
        }
        if !h.embedding_dims.is_multiple_of(VIEWS.len()) {
            return Err(err(format!(
                "embedding_dims must hold the {} views {VIEWS:?} equally",
                VIEWS.len()
            )));
        }
        if h.max_tokens < 2 {
            return Err(err("max_tokens must be at least 2".into()));
        }
        Ok(h)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, HeadError> {
        let text = std::fs::read_to_string(path).map_err(|e| HeadError {
            origin: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn builtin() -> Self {
        Self::parse(BUILTIN_HEAD, "built-in").expect("the built-in router head is valid")
    }

    /// Class probabilities of a feature vector, and the logits.
    pub fn predict(&self, f: &Features) -> ([f32; 3], [f32; 3]) {
        let x = self.inputs(f);
        let mut logits = [0f32; 3];
        for (c, l) in logits.iter_mut().enumerate() {
            *l = self.bias[c]
                + self.weights[c]
                    .iter()
                    .zip(&x)
                    .map(|(w, v)| w * v)
                    .sum::<f32>();
        }
        (softmax(&logits), logits)
    }

    /// The head's input: the embedding, then the standardised signals.
    fn inputs(&self, f: &Features) -> Vec<f32> {
        let mut x = Vec::with_capacity(self.embedding_dims + SIGNALS.len());
        x.extend_from_slice(&f.embedding);
        x.resize(self.embedding_dims, 0.0);
        for (i, s) in f.signals.iter().enumerate() {
            // Clipped to ±3 standard deviations: a signal the corpus rarely has (a
            // client's num_predict, a system prompt) must not outweigh what is asked.
            x.push(((s - self.signal_mean[i]) / self.signal_scale[i]).clamp(-CLIP, CLIP));
        }
        x
    }

    /// What moved the decision toward `tier`: for each signal, and for the embedding as
    /// a whole, its logit for `tier` minus its mean logit over the three tiers, largest
    /// first.
    pub fn contributions(&self, f: &Features, tier: Tier) -> Vec<(String, f32)> {
        let x = self.inputs(f);
        let c = tier_index(tier);
        let share = |range: std::ops::Range<usize>| {
            let logit = |k: usize| {
                range
                    .clone()
                    .map(|j| self.weights[k][j] * x[j])
                    .sum::<f32>()
            };
            logit(c) - (logit(0) + logit(1) + logit(2)) / 3.0
        };
        let d = self.embedding_dims;
        let per = d / VIEWS.len();
        let mut out: Vec<(String, f32)> = VIEWS
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    format!("embedding of the {v}"),
                    share(i * per..(i + 1) * per),
                )
            })
            .collect();
        for (i, name) in SIGNALS.iter().enumerate() {
            out.push((
                format!("{name} = {}", show_signal(i, f.signals[i])),
                share(d + i..d + i + 1),
            ));
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }
}

fn show_signal(i: usize, v: f32) -> String {
    match SIGNALS[i] {
        "has_code" | "system_prompt" | "num_predict_set" => (v > 0.5).to_string(),
        // Stored as ln(1 + n) (turns and num_predict as ln(n)): show n.
        "turns" | "num_predict" => format!("{:.0}", v.exp()),
        _ => format!("{:.0}", v.exp() - 1.0),
    }
}

pub fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Simple => 0,
        Tier::Moderate => 1,
        Tier::Complex => 2,
    }
}

fn softmax(l: &[f32; 3]) -> [f32; 3] {
    let max = l.iter().copied().fold(f32::MIN, f32::max);
    let e = l.map(|x| (x - max).exp());
    let sum: f32 = e.iter().sum();
    e.map(|x| x / sum)
}

/// What the head reads of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    pub embedding: Vec<f32>,
    /// In the order of [`SIGNALS`].
    pub signals: Vec<f32>,
}

/// The request signals of [`SIGNALS`], from the request and its split instruction.
pub fn signals(parts: &Parts, req: &Request) -> Vec<f32> {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let words = parts.instruction.split_whitespace().count();
    let system = req.system.is_some_and(|s| !s.trim().is_empty());
    let predict = req.num_predict.filter(|&n| n > 0);
    vec![
        (parts.code_lines as f32).ln_1p(),
        flag(parts.code_lines > 0),
        (parts.inline_code as f32).ln_1p(),
        (words as f32).ln_1p(),
        (req.turns.max(1) as f32).ln(),
        flag(system),
        flag(predict.is_some()),
        predict.map_or(0.0, |n| (n as f32).ln()),
    ]
}

/// The ends of a long `text`: at most `max_bytes`, half from its beginning and half from
/// its end (cut at character boundaries), joined by a line break.
pub fn text_ends(text: &str, max_bytes: usize) -> std::borrow::Cow<'_, str> {
    match crate::model::tokenizer::head_and_tail(text, max_bytes, max_bytes / 2) {
        None => text.into(),
        Some((head, tail)) => format!("{head}\n{tail}").into(),
    }
}

/// Word pieces of `text` for the static embedding: at most `max`, the beginning and the
/// end of a longer text kept (its text cut first to [`BYTES_PER_TOKEN`] bytes a piece).
pub fn embedding_ids(embedder: &Embedder, text: &str, max: usize) -> Result<Vec<u32>, EmbedError> {
    let max = max.max(1);
    let text = text_ends(text, max.saturating_mul(BYTES_PER_TOKEN));
    let mut ids = embedder.word_piece_ids(&text)?;
    if ids.len() > max {
        let head = max / 2;
        let tail = max - head;
        ids.drain(head..ids.len() - tail);
    }
    Ok(ids)
}

/// The static embedding of `ids`: the mean of their unit-length input vectors, scaled to
/// unit length (zeros for none).
fn static_embedding(embedder: &Embedder, ids: &[u32]) -> Result<Vec<f32>, EmbedError> {
    let v = embedder.static_mean(ids)?;
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    Ok(if norm > 0.0 {
        v.into_iter().map(|x| x / norm).collect()
    } else {
        v
    })
}

/// The first clause of an instruction: its first line with text, up to the first
/// sentence end (". ", "? ", "! ", ": ", "; ").
pub fn first_clause(instruction: &str) -> &str {
    let line = instruction
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let b = line.as_bytes();
    for i in 0..b.len() {
        let end = i + 1 == b.len() || b[i + 1].is_ascii_whitespace();
        if matches!(b[i], b'.' | b'?' | b'!' | b':' | b';') && end {
            return &line[..i];
        }
    }
    line
}

/// The features of a request: its instruction and first clause embedded (cut to
/// `max_tokens` word pieces) and its signals.
pub fn features(
    embedder: &Embedder,
    req: &Request,
    max_tokens: usize,
) -> Result<Features, EmbedError> {
    let parts = split_instruction(req.prompt);
    features_of(embedder, &parts, req, max_tokens)
}

pub fn features_of(
    embedder: &Embedder,
    parts: &Parts,
    req: &Request,
    max_tokens: usize,
) -> Result<Features, EmbedError> {
    let text = parts.instruction.trim();
    let mut embedding = static_embedding(embedder, &embedding_ids(embedder, text, max_tokens)?)?;
    let clause = embedding_ids(embedder, first_clause(text), CLAUSE_TOKENS.min(max_tokens))?;
    embedding.extend(static_embedding(embedder, &clause)?);
    Ok(Features {
        embedding,
        signals: signals(parts, req),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(dims: usize) -> Head {
        let n = dims + SIGNALS.len();
        let mut weights = vec![vec![0.0; n]; 3];
        // Class 2 (COMPLEX) likes embedding dim 0; class 0 (SIMPLE) likes has_code.
        weights[2][0] = 4.0;
        weights[0][dims + 1] = 1.0;
        Head {
            version: HEAD_VERSION,
            embedding_model: "test".into(),
            embedding_dims: dims,
            max_tokens: 16,
            classes: vec!["SIMPLE".into(), "MODERATE".into(), "COMPLEX".into()],
            signals: SIGNALS.map(String::from).into(),
            signal_mean: vec![0.0; SIGNALS.len()],
            signal_scale: vec![1.0; SIGNALS.len()],
            weights,
            bias: vec![0.0, 0.1, 0.0],
            training: serde_json::Value::Null,
        }
    }

    #[test]
    fn the_builtin_head_loads() {
        let h = Head::builtin();
        assert_eq!(h.weights.len(), 3);
        assert_eq!(h.weights[0].len(), h.embedding_dims + SIGNALS.len());
    }

    #[test]
    fn predictions_follow_the_weights() {
        let h = head(2);
        let f = Features {
            embedding: vec![1.0, 0.0],
            signals: vec![0.0; SIGNALS.len()],
        };
        let (p, _) = h.predict(&f);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(p[2] > p[0] && p[2] > p[1], "{p:?}");
        let top = h.contributions(&f, Tier::Complex);
        assert_eq!(top[0].0, "embedding of the instruction", "{top:?}");
        let f = Features {
            embedding: vec![0.0, 0.0],
            signals: vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        };
        let (p, _) = h.predict(&f);
        assert!(p[0] > p[1] && p[0] > p[2], "{p:?}");
    }

    #[test]
    fn bad_heads_are_refused_with_the_reason() {
        let good = serde_json::to_string(&head(2)).unwrap();
        assert!(Head::parse(&good, "t").is_ok());
        let mut h = head(2);
        h.weights[1].pop();
        let e = Head::parse(&serde_json::to_string(&h).unwrap(), "t").unwrap_err();
        assert!(e.to_string().contains("3 rows of 10"), "{e}");
        let mut h = head(2);
        h.signals[0] = "other".into();
        let e = Head::parse(&serde_json::to_string(&h).unwrap(), "t").unwrap_err();
        assert!(e.to_string().contains("retrain"), "{e}");
        let mut h = head(2);
        h.signal_scale[3] = 0.0;
        assert!(Head::parse(&serde_json::to_string(&h).unwrap(), "t").is_err());
        assert!(Head::parse("{", "t").is_err());
    }

    #[test]
    fn long_texts_keep_both_ends() {
        assert_eq!(text_ends("short", 10), "short");
        assert_eq!(text_ends("abcdefghij", 4), "ab\nij");
        // Never inside a character: é is 2 bytes.
        let t = "éééééé";
        let cut = text_ends(t, 5);
        assert!(
            cut.starts_with('é') && cut.ends_with('é') && cut.len() <= 6,
            "{cut}"
        );
        let mut h = head(2);
        h.version = 1;
        let e = Head::parse(&serde_json::to_string(&h).unwrap(), "t").unwrap_err();
        assert!(e.to_string().contains("retrain"), "{e}");
    }

    #[test]
    fn the_first_clause_is_the_ask() {
        assert_eq!(first_clause("fix this. it crashes"), "fix this");
        assert_eq!(first_clause("\n  what is 3.5? short"), "what is 3.5");
        assert_eq!(
            first_clause("add a docstring to\nmore"),
            "add a docstring to"
        );
        assert_eq!(
            first_clause("translate this to go: now"),
            "translate this to go"
        );
        assert_eq!(first_clause(""), "");
    }

    #[test]
    fn signals_measure_the_request() {
        let parts = split_instruction("Refactor `f` here:\ndef f(x):\n    return x");
        let s = signals(
            &parts,
            &Request {
                prompt: "",
                system: Some("be brief"),
                turns: 4,
                num_predict: Some(100),
            },
        );
        assert_eq!(s[0], 2f32.ln_1p());
        assert_eq!(s[1], 1.0);
        assert_eq!(s[2], 1f32.ln_1p()); // `f`
        assert_eq!(s[3], 2f32.ln_1p()); // "refactor  here"
        assert_eq!(s[4], 4f32.ln());
        assert_eq!(s[5], 1.0);
        assert_eq!((s[6], s[7]), (1.0, 100f32.ln()));
        let s = signals(&split_instruction("hi"), &Request::default());
        assert_eq!(
            (s[0], s[1], s[2], s[4], s[5], s[6], s[7]),
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        );
    }
}
