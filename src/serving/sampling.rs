//! Generation options with Ollama's names and defaults, and the sampler.
//!
//! The sampling chain follows llama.cpp's, which Ollama's runner uses: repetition
//! penalties → top_k → top_p → min_p → temperature → draw. `temperature <= 0` is greedy
//! argmax over the raw logits (penalties are not applied there, as in Ollama's own
//! sampler), so temperature 0 reproduces a reference greedy decode exactly.

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// Ollama's `options` object. Unknown keys are ignored, as Ollama ignores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Options {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub typical_p: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at; 0 disables, -1 means num_ctx.
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// -1 draws a random seed.
    pub seed: i64,
    pub stop: Vec<String>,
    /// Tokens to generate; -1 means no limit (until end of turn), -2 fills the context.
    pub num_predict: i32,
    pub num_ctx: usize,
    /// Prompt tokens kept at the front when the prompt or generation outgrows num_ctx.
    pub num_keep: i32,
}

/// Ollama's default context length (its OLLAMA_CONTEXT_LENGTH default).
pub const DEFAULT_NUM_CTX: usize = 4096;

/// The largest num_ctx a request may ask for: Qwen2.5's longest context (128K with
/// YaRN). Below it, a num_ctx beyond what the model or its KV cache holds is capped
/// silently, as clients send their own idea of the window (Zed sends 32768).
pub const MAX_NUM_CTX: usize = 131_072;

/// The largest num_predict a request may ask for. A larger count is no generation
/// anyone waits for (a million tokens is hours on any device); the server's
/// `--max-predict` caps lower values silently.
pub const MAX_NUM_PREDICT: i32 = 1 << 20;

/// Stop sequences per request, and bytes per stop sequence: the stop matcher looks at
/// each of them after every token (OpenAI allows 4; clients send a handful).
pub const MAX_STOPS: usize = 64;
pub const MAX_STOP_BYTES: usize = 512;

impl Default for Options {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            typical_p: 1.0,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: -1,
            stop: Vec::new(),
            num_predict: -1,
            num_ctx: DEFAULT_NUM_CTX,
            num_keep: 4,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid option {name}: {message}")]
pub struct OptionError {
    pub name: &'static str,
    pub message: String,
}

impl Options {
    /// Rejects values no sampler can honour, with the option's name.
    pub fn validate(&self) -> Result<(), OptionError> {
        let bad = |name, message: &str| {
            Err(OptionError {
                name,
                message: message.to_string(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a number >= 0");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad("top_p", "must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be between 0 and 1");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty < 0.0 {
            return bad("repeat_penalty", "must be a number >= 0");
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("presence_penalty", "must be finite");
        }
        if self.repeat_last_n < -1 {
            return bad("repeat_last_n", "must be -1, 0 or a positive count");
        }
        if self.num_predict < -2 {
            return bad("num_predict", "must be -2, -1 or a count >= 0");
        }
        if self.num_predict > MAX_NUM_PREDICT {
            return bad(
                "num_predict",
                &format!("must be at most {MAX_NUM_PREDICT} (or -1 for the server's limit)"),
            );
        }
        if self.num_ctx < 2 {
            return bad("num_ctx", "must be at least 2");
        }
        if self.num_ctx > MAX_NUM_CTX {
            return bad("num_ctx", &format!("must be at most {MAX_NUM_CTX}"));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "stop sequences must not be empty");
        }
        if self.stop.len() > MAX_STOPS {
            return bad("stop", &format!("at most {MAX_STOPS} stop sequences"));
        }
        if self.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return bad(
                "stop",
                &format!("each stop sequence must be at most {MAX_STOP_BYTES} bytes"),
            );
        }
        Ok(())
    }
}

pub struct Sampler {
    opts: Options,
    rng: StdRng,
    /// Scratch: (token, logit) candidates surviving the filters.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(opts: &Options) -> Self {
        let rng = if opts.seed < 0 {
            StdRng::from_os_rng()
        } else {
            StdRng::seed_from_u64(opts.seed as u64)
        };
        Self {
            opts: opts.clone(),
            rng,
            candidates: Vec::new(),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.opts.temperature <= 0.0
    }

    /// Picks the next token from `logits`, given every token of the sequence so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        self.apply_penalties(logits, history);
        let o = &self.opts;
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        if cands.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if o.top_k > 0 && (o.top_k as usize) < cands.len() {
            let k = o.top_k as usize;
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
        }
        cands.sort_unstable_by(by_logit_desc);

        // Probabilities at temperature 1 drive top_p and min_p, as in llama.cpp.
        let probs = softmax(cands.iter().map(|c| c.1));
        let mut keep = cands.len();
        if o.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= o.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if o.min_p > 0.0 {
            let floor = probs[0] * o.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        cands.truncate(keep.max(1));

        let t = o.temperature;
        let weights = softmax(cands.iter().map(|c| c.1 / t));
        match WeightedIndex::new(&weights) {
            Ok(dist) => cands[dist.sample(&mut self.rng)].0,
            Err(_) => cands[0].0,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let o = &self.opts;
        let window = match o.repeat_last_n {
            0 => return,
            n if n < 0 => o.num_ctx,
            n => n as usize,
        };
        if o.repeat_penalty == 1.0 && o.presence_penalty == 0.0 && o.frequency_penalty == 0.0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(window)..];
        let mut counts: std::collections::HashMap<u32, u32> = Default::default();
        for &t in recent {
            *counts.entry(t).or_default() += 1;
        }
        for (&tok, &n) in &counts {
            let Some(l) = logits.get_mut(tok as usize) else {
                continue;
            };
            if o.repeat_penalty != 1.0 && o.repeat_penalty > 0.0 {
                *l = if *l > 0.0 {
                    *l / o.repeat_penalty
                } else {
                    *l * o.repeat_penalty
                };
            }
            *l -= n as f32 * o.frequency_penalty + o.presence_penalty;
        }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

fn softmax(xs: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = xs.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            seed: 7,
            ..Options::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_ignores_penalties() {
        let mut s = Sampler::new(&Options {
            temperature: 0.0,
            repeat_penalty: 5.0,
            ..opts()
        });
        let mut logits = vec![0.1, 3.0, 2.9, -1.0];
        assert_eq!(s.sample(&mut logits, &[1, 1, 1]), 1);
    }

    #[test]
    fn top_k_one_is_deterministic() {
        let mut s = Sampler::new(&Options { top_k: 1, ..opts() });
        for _ in 0..20 {
            let mut logits = vec![0.5, 0.4, 2.0, 1.9];
            assert_eq!(s.sample(&mut logits, &[]), 2);
        }
    }

    #[test]
    fn seeded_draws_repeat() {
        let draw = || {
            let mut s = Sampler::new(&Options {
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                ..opts()
            });
            (0..50)
                .map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.05, 0.95], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(
            a.iter().any(|&t| t != a[0]),
            "a flat distribution must vary: {a:?}"
        );
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(&Options {
            top_k: 1,
            repeat_penalty: 2.0,
            ..opts()
        });
        let mut logits = vec![2.0, 1.5];
        assert_eq!(s.sample(&mut logits, &[0]), 1);
        let mut logits = vec![2.0, 1.5];
        let mut s = Sampler::new(&Options {
            top_k: 1,
            repeat_penalty: 1.0,
            presence_penalty: 1.0,
            ..opts()
        });
        assert_eq!(s.sample(&mut logits, &[0]), 1);
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // One token holds almost all the mass: top_p 0.5 keeps only it.
        let mut s = Sampler::new(&Options {
            top_k: 0,
            top_p: 0.5,
            temperature: 5.0,
            ..opts()
        });
        for _ in 0..30 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0, 0.0], &[]), 0);
        }
        let mut s = Sampler::new(&Options {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            temperature: 5.0,
            ..opts()
        });
        for _ in 0..30 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 0.0, 0.0], &[]), 1);
        }
    }

    #[test]
    fn options_parse_like_ollama() {
        let o: Options =
            serde_json::from_str(r#"{"temperature":0,"num_predict":5,"mirostat":2,"stop":["\n"]}"#)
                .unwrap();
        assert_eq!(o.temperature, 0.0);
        assert_eq!(o.num_predict, 5);
        assert_eq!(o.top_k, 40);
        assert_eq!(o.stop, vec!["\n".to_string()]);
        assert!(o.validate().is_ok());
        let bad = Options {
            top_p: 2.0,
            ..Options::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "top_p");
    }

    #[test]
    fn hostile_sizes_are_refused_by_name() {
        let name = |o: Options| o.validate().map_err(|e| e.name);
        let base = Options::default;
        assert_eq!(
            name(Options {
                num_ctx: MAX_NUM_CTX + 1,
                ..base()
            }),
            Err("num_ctx")
        );
        assert_eq!(
            name(Options {
                num_ctx: MAX_NUM_CTX,
                ..base()
            }),
            Ok(())
        );
        assert_eq!(
            name(Options {
                num_predict: MAX_NUM_PREDICT + 1,
                ..base()
            }),
            Err("num_predict")
        );
        assert_eq!(
            name(Options {
                stop: vec!["x".into(); MAX_STOPS + 1],
                ..base()
            }),
            Err("stop")
        );
        assert_eq!(
            name(Options {
                stop: vec!["x".repeat(MAX_STOP_BYTES + 1)],
                ..base()
            }),
            Err("stop")
        );
        assert_eq!(
            name(Options {
                stop: vec!["x".repeat(MAX_STOP_BYTES); MAX_STOPS],
                ..base()
            }),
            Ok(())
        );
    }
}
