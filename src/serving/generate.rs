//! One generation: prefill the prompt in chunks, then sample token by token. A
//! [`Generation`] is an iterator of text pieces, so callers stream as tokens appear and
//! cancel by dropping it; [`Generation::summary`] gives Ollama's counts and timings.

use super::sampling::{Options, Sampler};
use crate::model::qwen2::KvCache;
use crate::model::tokenizer::StreamDecoder;
use crate::model::{grammar, EngineError, Model, TextCodec};
use std::time::{Duration, Instant};

/// Tokens pushed through the model per forward pass while prefilling (Ollama's num_batch).
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DoneReason {
    /// End of turn, or a stop sequence.
    Stop,
    /// num_predict reached, or the context is full.
    Length,
}

impl DoneReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DoneReason::Stop => "stop",
            DoneReason::Length => "length",
        }
    }
}

/// A piece of output: the text a token completed (may be empty while a multi-byte
/// character or a possible stop sequence is held back).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub token: Option<u32>,
    pub text: String,
    /// The token's log probability (and the most likely alternatives), when asked for.
    pub logprob: Option<Logprob>,
}

/// One token and its log probability under the model (before sampling settings).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// A generated token's log probability and the `top` most likely tokens at its place.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Logprob {
    #[serde(flatten)]
    pub token: TokenLogprob,
    pub top_logprobs: Vec<TokenLogprob>,
}

/// The most top-logprobs a request may ask for (OpenAI's and Ollama's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

fn logprob_of(codec: &TextCodec, logits: &[f32], chosen: u32, top: usize) -> Logprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>();
    let lse = max + sum.ln() as f32;
    let entry = |id: u32| {
        let bytes = codec.token_bytes(id);
        TokenLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob: logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |l| l - lse),
            bytes,
        }
    };
    let mut best: Vec<u32> = Vec::new();
    if top > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let k = top.min(ids.len());
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, by_logit);
            ids.truncate(k);
        }
        ids.sort_unstable_by(by_logit);
        best = ids;
    }
    Logprob {
        token: entry(chosen),
        top_logprobs: best.into_iter().map(entry).collect(),
    }
}

/// Counts and timings as Ollama reports them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub done_reason: DoneReason,
    pub prompt_eval_count: usize,
    pub prompt_eval_duration: Duration,
    pub eval_count: usize,
    pub eval_duration: Duration,
    pub load_duration: Duration,
    pub total_duration: Duration,
    /// Prompt (after any truncation) followed by the generated tokens.
    pub context: Vec<u32>,
    /// Whether the prompt was cut to fit num_ctx.
    pub truncated: bool,
}

/// Holds back text that might be the start of a stop sequence; cuts at a full match.
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Adds text; returns what is safe to emit and whether a stop sequence was hit.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Emit everything up to the earliest suffix that could still grow into a stop.
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold_from].to_string();
        self.pending.drain(..hold_from);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

pub struct Generation<'m> {
    model: &'m Model,
    opts: Options,
    cache: KvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    /// The context: prompt (after truncation and shifts) then generated tokens.
    tokens: Vec<u32>,
    /// Every token generated, shifts or not.
    output: Vec<u32>,
    prompt_len: usize,
    truncated: bool,
    logits: Option<Vec<f32>>,
    started: Instant,
    prompt_eval: Duration,
    eval: Duration,
    eval_count: usize,
    done: Option<DoneReason>,
    finished: bool,
    /// Benchmarks generate a fixed number of tokens: end-of-turn tokens do not stop them.
    ignore_stop_tokens: bool,
    /// Structured output: the grammar the answer must follow.
    constraint: Option<grammar::Constraint>,
    /// Report each token's log probability with this many alternatives.
    logprobs: Option<usize>,
}

impl<'m> Generation<'m> {
    pub(super) fn new(
        model: &'m Model,
        prompt: Vec<u32>,
        opts: &Options,
    ) -> Result<Self, EngineError> {
        opts.validate()
            .map_err(|e| EngineError::Option(e.to_string()))?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let mut opts = opts.clone();
        opts.num_ctx = opts.num_ctx.min(model.weights.max_positions());
        let (tokens, truncated) = truncate_prompt(prompt, opts.num_ctx, opts.num_keep);
        if truncated {
            tracing::warn!(
                model = %model.name,
                limit = opts.num_ctx,
                kept = tokens.len(),
                "prompt longer than num_ctx: truncated, keeping the first num_keep tokens and the end"
            );
        }
        Ok(Self {
            model,
            // Room for the prompt and the answer, bounded by the context.
            cache: model
                .weights
                .new_cache(match usize::try_from(opts.num_predict) {
                    Ok(n) => (tokens.len() + n + 1).min(opts.num_ctx),
                    Err(_) => opts.num_ctx,
                }),
            sampler: Sampler::new(&opts),
            decoder: StreamDecoder::default(),
            stop: StopMatcher {
                stops: opts.stop.clone(),
                pending: String::new(),
            },
            prompt_len: tokens.len(),
            tokens,
            output: Vec::new(),
            truncated,
            logits: None,
            started: Instant::now(),
            prompt_eval: Duration::ZERO,
            eval: Duration::ZERO,
            eval_count: 0,
            done: None,
            finished: false,
            ignore_stop_tokens: false,
            constraint: None,
            logprobs: None,
            opts,
        })
    }

    /// Runs `tokens` through the model in chunks, leaving the last position's logits.
    fn feed(&mut self, from: usize) -> Result<(), EngineError> {
        let mut logits = None;
        let mut at = from;
        while at < self.tokens.len() {
            let end = (at + PREFILL_CHUNK).min(self.tokens.len());
            logits = Some(
                self.model
                    .weights
                    .forward(&self.tokens[at..end], &mut self.cache)?,
            );
            at = end;
        }
        if let Some(l) = logits {
            self.logits = Some(l.to_vec1::<f32>()?);
        }
        Ok(())
    }

    /// Ollama's context shift: keep num_keep tokens, drop half of the rest, recompute.
    fn shift_context(&mut self) -> Result<(), EngineError> {
        let keep = (self.opts.num_keep.max(0) as usize).min(self.tokens.len());
        let discard = (self.tokens.len() - keep) / 2;
        self.tokens.drain(keep..keep + discard);
        self.cache.clear();
        self.feed(0)
    }

    fn finish(&mut self, mut reason: DoneReason) -> Result<Option<Piece>, EngineError> {
        // Text held back (a possible stop sequence, an incomplete character) is released
        // now, unless the last bytes complete a stop sequence after all.
        let tail = self.decoder.flush(&self.model.codec)?;
        let (mut text, hit) = self.stop.push(&tail);
        if hit {
            reason = DoneReason::Stop;
        } else {
            text.push_str(&self.stop.flush());
        }
        self.done = Some(reason);
        Ok((!text.is_empty()).then_some(Piece {
            token: None,
            text,
            logprob: None,
        }))
    }

    fn step(&mut self) -> Result<Option<Piece>, EngineError> {
        if self.logits.is_none() {
            let t = Instant::now();
            self.feed(0)?;
            self.prompt_eval = t.elapsed();
        }
        let limit = match self.opts.num_predict {
            n if n >= 0 => Some(n as usize),
            _ => None,
        };
        if limit == Some(self.eval_count) {
            return self.finish(DoneReason::Length);
        }
        let t = Instant::now();
        let mut logits = self.logits.take().unwrap_or_default();
        // Log probabilities are the model's own, before the grammar and the sampler.
        let raw = self.logprobs.map(|_| logits.clone());
        if let Some(c) = self.constraint.as_mut() {
            c.mask(&mut logits).map_err(EngineError::Grammar)?;
        }
        let token = self.sampler.sample(&mut logits, &self.tokens);
        let logprob =
            raw.map(|raw| logprob_of(&self.model.codec, &raw, token, self.logprobs.unwrap_or(0)));
        if self.model.codec.is_stop(token) && !self.ignore_stop_tokens {
            self.eval += t.elapsed();
            return self.finish(DoneReason::Stop);
        }
        // The answer is complete when the grammar allows nothing more.
        let complete = match self.constraint.as_mut() {
            Some(c) => c.accept(token).map_err(EngineError::Grammar)?,
            None => false,
        };
        self.tokens.push(token);
        self.output.push(token);
        self.eval_count += 1;
        let piece = self.decoder.push(&self.model.codec, token)?;
        let (text, hit) = self.stop.push(&piece);
        if complete && !hit {
            self.eval += t.elapsed();
            let out = Piece {
                token: Some(token),
                text,
                logprob,
            };
            let tail = self.finish(DoneReason::Stop)?;
            return Ok(Some(merge(out, tail)));
        }
        if hit {
            self.eval += t.elapsed();
            self.done = Some(DoneReason::Stop);
            return Ok(Some(Piece {
                token: Some(token),
                text,
                logprob,
            }));
        }
        let out = Piece {
            token: Some(token),
            text,
            logprob,
        };
        if limit == Some(self.eval_count) {
            // No need to run the model for a token nobody will sample.
            self.eval += t.elapsed();
            let tail = self.finish(DoneReason::Length)?;
            return Ok(Some(merge(out, tail)));
        }
        if self.tokens.len() >= self.opts.num_ctx {
            if self.opts.num_predict == -2 {
                self.eval += t.elapsed();
                let tail = self.finish(DoneReason::Length)?;
                return Ok(Some(merge(out, tail)));
            }
            self.shift_context()?;
        } else {
            let logits = self.model.weights.forward(&[token], &mut self.cache)?;
            self.logits = Some(logits.to_vec1::<f32>()?);
        }
        self.eval += t.elapsed();
        Ok(Some(out))
    }

    /// Reports each generated token's log probability with `top` alternatives.
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top.min(MAX_TOP_LOGPROBS));
        self
    }

    /// Keeps the output to `constraint`'s grammar.
    pub fn with_constraint(mut self, constraint: grammar::Constraint) -> Self {
        self.constraint = Some(constraint);
        self
    }

    /// Keeps generating past end-of-turn tokens (for fixed-length benchmarks).
    pub fn ignore_stop_tokens(mut self) -> Self {
        self.ignore_stop_tokens = true;
        self
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.output
    }

    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }

    /// Counts and timings; `done_reason` is `length` if called before the end.
    pub fn summary(&self) -> Summary {
        Summary {
            done_reason: self.done.unwrap_or(DoneReason::Length),
            prompt_eval_count: self.prompt_len,
            prompt_eval_duration: self.prompt_eval,
            eval_count: self.eval_count,
            eval_duration: self.eval,
            load_duration: self.model.load_duration,
            total_duration: self.started.elapsed(),
            context: self.tokens.clone(),
            truncated: self.truncated,
        }
    }

    /// Runs to the end and returns the whole text.
    pub fn collect_text(&mut self) -> Result<String, EngineError> {
        let mut out = String::new();
        for piece in self.by_ref() {
            out.push_str(&piece?.text);
        }
        Ok(out)
    }
}

fn merge(mut a: Piece, b: Option<Piece>) -> Piece {
    if let Some(b) = b {
        a.text.push_str(&b.text);
    }
    a
}

impl Iterator for Generation<'_> {
    type Item = Result<Piece, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.finished {
                return None;
            }
            if self.done.is_some() {
                self.finished = true;
                return None;
            }
            match self.step() {
                Ok(Some(piece)) => return Some(Ok(piece)),
                Ok(None) => continue,
                Err(e) => {
                    self.finished = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Fits a prompt into `num_ctx - 1` positions (room for at least one new token) the way
/// Ollama does: keep the first `num_keep` tokens, drop from just after them.
pub fn truncate_prompt(mut prompt: Vec<u32>, num_ctx: usize, num_keep: i32) -> (Vec<u32>, bool) {
    let room = num_ctx.saturating_sub(1).max(1);
    if prompt.len() <= room {
        return (prompt, false);
    }
    let keep = (num_keep.max(0) as usize).min(room / 2);
    let discard = prompt.len() - room;
    prompt.drain(keep..keep + discard);
    (prompt, true)
}

impl Model {
    /// Starts generating after `prompt` (token ids). Nothing runs until it is iterated.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        opts: &Options,
    ) -> Result<Generation<'_>, EngineError> {
        Generation::new(self, prompt, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopMatcher {
        StopMatcher {
            stops: s.iter().map(|s| s.to_string()).collect(),
            pending: String::new(),
        }
    }

    #[test]
    fn stop_matcher_holds_back_partial_matches() {
        let mut m = stops(&["END"]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dless"), (String::new(), true));
        let mut m = stops(&["END"]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_matcher_cuts_at_the_earliest_stop() {
        let mut m = stops(&["\n\n", "b"]);
        assert_eq!(m.push("a\n\nb"), ("a".to_string(), true));
    }

    #[test]
    fn truncation_keeps_head_and_tail() {
        let (p, t) = truncate_prompt((0..10).collect(), 6, 2);
        assert!(t);
        assert_eq!(p, vec![0, 1, 7, 8, 9]);
        let (p, t) = truncate_prompt((0..4).collect(), 6, 2);
        assert!(!t);
        assert_eq!(p.len(), 4);
    }
}
