//! One request's decoding: what happens to a sequence's logits (grammar mask, sampling,
//! log probabilities, end-of-turn and stop sequences, num_predict, the context shift)
//! and Ollama's counts and timings. The same [`Decoding`] runs inside the scheduler's
//! batches for the server and alone for `duet run`.

use super::sampling::{Options, Sampler};
use super::scheduler::{Advance, Then};
use crate::model::tokenizer::StreamDecoder;
use crate::model::{grammar, EngineError, TextCodec};
use std::time::{Duration, Instant};

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
    /// Prompt positions taken from the prefix cache instead of computed (included in
    /// `prompt_eval_count`, which counts the whole prompt as Ollama does).
    pub cached_tokens: usize,
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

/// The longest span the loop guard looks for, in tokens.
pub const LOOP_MAX_PERIOD: usize = 64;
/// A span counts as a loop once the output ends with it repeated this many times…
pub const LOOP_MIN_REPEATS: usize = 16;
/// …covering at least this many tokens (so a short separator line is not a loop).
pub const LOOP_MIN_TOKENS: usize = 256;

/// Notices a generation that has degenerated into repeating itself: the output ends
/// with the same span of 1 to [`LOOP_MAX_PERIOD`] tokens repeated at least
/// [`LOOP_MIN_REPEATS`] times over at least [`LOOP_MIN_TOKENS`] tokens. Without it a
/// request with no num_predict could repeat a word until the server's limit, holding
/// its model's batch slot (the context shift lets it run forever otherwise).
#[derive(Debug, Clone)]
pub struct LoopGuard {
    /// `runs[p]`: how many of the last tokens equal the token `p` places before them
    /// (the output ends with a span of period `p` over `runs[p] + p` tokens).
    runs: [usize; LOOP_MAX_PERIOD + 1],
}

impl Default for LoopGuard {
    fn default() -> Self {
        Self {
            runs: [0; LOOP_MAX_PERIOD + 1],
        }
    }
}

impl LoopGuard {
    /// Takes the output so far, whose last token is new; returns the period of the
    /// loop it now ends in, if it does.
    pub fn push(&mut self, output: &[u32]) -> Option<usize> {
        let n = output.len();
        let last = *output.last()?;
        let mut found = None;
        for p in 1..=LOOP_MAX_PERIOD {
            if n > p && output[n - 1 - p] == last {
                self.runs[p] += 1;
            } else {
                self.runs[p] = 0;
            }
            let span = self.runs[p] + p;
            if found.is_none() && span >= LOOP_MIN_TOKENS.max(LOOP_MIN_REPEATS * p) {
                found = Some(p);
            }
        }
        found
    }
}

/// How a scoring request longer than the model's context is refused (the API answers
/// it with a 400).
pub const TOO_LONG_TO_SCORE: &str =
    "the text to score is longer than the context this model has here";

/// The decoding state of one request.
pub struct Decoding {
    opts: Options,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    /// Every token generated, shifts or not.
    output: Vec<u32>,
    prompt_len: usize,
    truncated: bool,
    started: Instant,
    admitted: Option<Instant>,
    first_logits: Option<Instant>,
    prompt_eval: Duration,
    eval: Duration,
    eval_count: usize,
    cached: Option<usize>,
    done: Option<DoneReason>,
    /// The context at the end: prompt (after truncation and shifts) then generated tokens.
    context: Vec<u32>,
    /// Benchmarks generate a fixed number of tokens: end-of-turn tokens do not stop them.
    ignore_stop_tokens: bool,
    /// Structured output: the grammar the answer must follow.
    constraint: Option<grammar::Constraint>,
    /// Report each token's log probability with this many alternatives.
    logprobs: Option<usize>,
    /// Ends the generation when it only repeats itself.
    loops: LoopGuard,
    /// Scoring the prompt instead of generating: the first position scored, and each
    /// scored token's log probability once its row has run.
    scoring: Option<(usize, Vec<Option<Logprob>>)>,
}

impl Decoding {
    /// Checks the options and fits the prompt into num_ctx (at most `max_ctx`, what the
    /// model and its cache hold); returns the state and the prompt to run.
    pub fn new(
        prompt: Vec<u32>,
        opts: &Options,
        max_ctx: usize,
        model: &str,
    ) -> Result<(Self, Vec<u32>), EngineError> {
        opts.validate()
            .map_err(|e| EngineError::Option(e.to_string()))?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let mut opts = opts.clone();
        opts.num_ctx = opts.num_ctx.min(max_ctx).max(2);
        let (tokens, truncated) = truncate_prompt(prompt, opts.num_ctx, opts.num_keep);
        if truncated {
            tracing::warn!(
                %model,
                limit = opts.num_ctx,
                kept = tokens.len(),
                "prompt longer than num_ctx: truncated, keeping the first num_keep tokens and the end"
            );
        }
        let d = Self {
            sampler: Sampler::new(&opts),
            decoder: StreamDecoder::default(),
            stop: StopMatcher {
                stops: opts.stop.clone(),
                pending: String::new(),
            },
            output: Vec::new(),
            prompt_len: tokens.len(),
            truncated,
            started: Instant::now(),
            admitted: None,
            first_logits: None,
            prompt_eval: Duration::ZERO,
            eval: Duration::ZERO,
            eval_count: 0,
            cached: None,
            done: None,
            context: Vec::new(),
            ignore_stop_tokens: false,
            constraint: None,
            logprobs: None,
            loops: LoopGuard::default(),
            scoring: None,
            opts,
        };
        Ok((d, tokens))
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

    /// Scores the prompt instead of generating: the log probability of each of its
    /// tokens from position `from` on (with the alternatives asked for by
    /// [`with_logprobs`](Self::with_logprobs)), as when the quality model audits a draft.
    /// Nothing is generated. A prompt cut to num_ctx cannot be scored.
    pub fn scoring(mut self, from: usize) -> Result<Self, EngineError> {
        if self.truncated {
            return Err(EngineError::Option(format!(
                "{TOO_LONG_TO_SCORE} ({} tokens)",
                self.opts.num_ctx
            )));
        }
        if from == 0 || from >= self.prompt_len {
            return Err(EngineError::Option(format!(
                "nothing to score: position {from} of a {}-token text (the first token has no log probability)",
                self.prompt_len
            )));
        }
        self.opts.num_predict = 0;
        self.scoring = Some((from, vec![None; self.prompt_len - from]));
        Ok(self)
    }

    /// The first position scored, for a scoring sequence.
    pub fn scores_from(&self) -> Option<usize> {
        self.scoring.as_ref().map(|s| s.0)
    }

    /// The logits of position `at` of `tokens`: the log probability of the token after
    /// it, when that token is scored (a row run twice, after a preemption, counts once).
    pub fn observe(&mut self, codec: &TextCodec, tokens: &[u32], at: usize, logits: &[f32]) {
        let top = self.logprobs.unwrap_or(0);
        let Some((from, scores)) = self.scoring.as_mut() else {
            return;
        };
        let (Some(i), Some(&next)) = ((at + 1).checked_sub(*from), tokens.get(at + 1)) else {
            return;
        };
        if let Some(slot) = scores.get_mut(i).filter(|s| s.is_none()) {
            *slot = Some(logprob_of(codec, logits, next, top));
        }
    }

    /// The scored tokens' log probabilities, in order (once, when all have run).
    pub fn take_scores(&mut self) -> Option<Vec<Logprob>> {
        let (_, scores) = self.scoring.as_mut()?;
        std::mem::take(scores).into_iter().collect()
    }

    /// Keeps generating past end-of-turn tokens (for fixed-length benchmarks).
    pub fn ignore_stop_tokens(mut self) -> Self {
        self.ignore_stop_tokens = true;
        self
    }

    /// The sequence starts running with `cached` positions from the prefix cache (the
    /// first admission counts; a preempted sequence is admitted again).
    pub fn admitted(&mut self, cached: usize) {
        if self.admitted.is_none() {
            self.admitted = Some(Instant::now());
            self.cached = Some(cached);
        }
    }

    fn mark_done(&mut self, reason: DoneReason, tokens: &[u32], last: Option<u32>) {
        self.done = Some(reason);
        self.eval = self.first_logits.map_or(Duration::ZERO, |t| t.elapsed());
        self.context = tokens.iter().copied().chain(last).collect();
    }

    fn finish(
        &mut self,
        codec: &TextCodec,
        mut reason: DoneReason,
        tokens: &[u32],
        last: Option<u32>,
    ) -> Result<Option<Piece>, EngineError> {
        // Text held back (a possible stop sequence, an incomplete character) is released
        // now, unless the last bytes complete a stop sequence after all.
        let tail = self.decoder.flush(codec)?;
        let (mut text, hit) = self.stop.push(&tail);
        if hit {
            reason = DoneReason::Stop;
        } else {
            text.push_str(&self.stop.flush());
        }
        self.mark_done(reason, tokens, last);
        Ok((!text.is_empty()).then_some(Piece {
            token: None,
            text,
            logprob: None,
        }))
    }

    /// Acts on the logits of the last position of `tokens` (the context so far): the
    /// text to emit, if any, and what the sequence does next.
    pub fn advance(
        &mut self,
        codec: &TextCodec,
        tokens: &[u32],
        logits: &[f32],
    ) -> Result<(Option<Piece>, Advance), EngineError> {
        let stop = |token| Advance {
            token,
            then: Then::Finish,
        };
        let now = Instant::now();
        if self.first_logits.is_none() {
            self.prompt_eval = now - self.admitted.unwrap_or(self.started);
            self.first_logits = Some(now);
        }
        let limit = usize::try_from(self.opts.num_predict).ok();
        if limit == Some(self.eval_count) {
            return Ok((
                self.finish(codec, DoneReason::Length, tokens, None)?,
                stop(None),
            ));
        }
        let mut logits = logits.to_vec();
        // Log probabilities are the model's own, before the grammar and the sampler.
        let raw = self.logprobs.map(|_| logits.clone());
        if let Some(c) = self.constraint.as_mut() {
            c.mask(&mut logits).map_err(EngineError::Grammar)?;
        }
        let token = self.sampler.sample(&mut logits, tokens);
        let logprob = raw.map(|raw| logprob_of(codec, &raw, token, self.logprobs.unwrap_or(0)));
        if codec.is_stop(token) && !self.ignore_stop_tokens {
            return Ok((
                self.finish(codec, DoneReason::Stop, tokens, None)?,
                stop(None),
            ));
        }
        // The answer is complete when the grammar allows nothing more.
        let complete = match self.constraint.as_mut() {
            Some(c) => c.accept(token).map_err(EngineError::Grammar)?,
            None => false,
        };
        self.output.push(token);
        self.eval_count += 1;
        let piece = self.decoder.push(codec, token)?;
        let (text, hit) = self.stop.push(&piece);
        let out = Piece {
            token: Some(token),
            text,
            logprob,
        };
        if hit {
            self.mark_done(DoneReason::Stop, tokens, Some(token));
            return Ok((Some(out), stop(Some(token))));
        }
        // A generation stuck repeating one span ends as if it had reached its limit
        // (benchmarks that ignore end-of-turn generate noise and are left alone).
        let looping = match self.loops.push(&self.output) {
            Some(period) if !self.ignore_stop_tokens => {
                tracing::info!(
                    period,
                    tokens = self.eval_count,
                    "the answer repeats one span over and over: ended (done_reason length)"
                );
                true
            }
            _ => false,
        };
        let reason = if complete {
            Some(DoneReason::Stop)
        } else if looping {
            Some(DoneReason::Length)
        } else if limit == Some(self.eval_count)
            || (tokens.len() + 1 >= self.opts.num_ctx && self.opts.num_predict == -2)
        {
            // No need to run the model for a token nobody will sample.
            Some(DoneReason::Length)
        } else {
            None
        };
        if let Some(reason) = reason {
            let tail = self.finish(codec, reason, tokens, Some(token))?;
            return Ok((Some(merge(out, tail)), stop(Some(token))));
        }
        let then = if tokens.len() + 1 >= self.opts.num_ctx {
            // Ollama's context shift: keep num_keep tokens, drop half of the rest.
            let len = tokens.len() + 1;
            let keep = (self.opts.num_keep.max(0) as usize).min(len);
            Then::Shift {
                keep,
                discard: (len - keep) / 2,
            }
        } else {
            Then::Continue
        };
        Ok((
            Some(out),
            Advance {
                token: Some(token),
                then,
            },
        ))
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.output
    }

    /// Counts and timings; `done_reason` is `length` if called before the end.
    pub fn summary(&self) -> Summary {
        Summary {
            done_reason: self.done.unwrap_or(DoneReason::Length),
            prompt_eval_count: self.prompt_len,
            prompt_eval_duration: self.prompt_eval,
            eval_count: self.eval_count,
            eval_duration: self.eval,
            load_duration: Duration::ZERO,
            total_duration: self.started.elapsed(),
            context: self.context.clone(),
            truncated: self.truncated,
            cached_tokens: self.cached.unwrap_or(0),
        }
    }
}

fn merge(mut a: Piece, b: Option<Piece>) -> Piece {
    if let Some(b) = b {
        a.text.push_str(&b.text);
    }
    a
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

    /// Feeds `tokens` to a fresh guard; the index at which it first reports a loop.
    fn loop_at(tokens: &[u32]) -> Option<(usize, usize)> {
        let mut g = LoopGuard::default();
        (1..=tokens.len()).find_map(|n| g.push(&tokens[..n]).map(|p| (n, p)))
    }

    #[test]
    fn the_loop_guard_ends_a_repeated_span_and_nothing_else() {
        // One token over and over: a loop once LOOP_MIN_TOKENS long.
        assert_eq!(
            loop_at(&[7; 1000]),
            Some((LOOP_MIN_TOKENS, 1)),
            "a repeated token"
        );
        // A 5-token phrase repeated: caught at LOOP_MIN_TOKENS, as period 5.
        let phrase: Vec<u32> = (0..1000).map(|i| [1, 2, 3, 4, 5][i % 5]).collect();
        assert_eq!(loop_at(&phrase), Some((LOOP_MIN_TOKENS, 5)));
        // A long span needs LOOP_MIN_REPEATS repeats, more than LOOP_MIN_TOKENS tokens.
        let long: Vec<u32> = (0..5000).map(|i| (i % 50) as u32).collect();
        assert_eq!(loop_at(&long), Some((50 * LOOP_MIN_REPEATS, 50)));
        // A loop after ordinary text is found as soon as it is long enough.
        let mut text: Vec<u32> = (100..400).collect();
        text.extend([9, 8].repeat(400));
        assert_eq!(loop_at(&text), Some((300 + LOOP_MIN_TOKENS, 2)));
        // Text that never repeats, a separator shorter than the minimum, and a span
        // longer than the longest period are not loops.
        assert_eq!(loop_at(&(0..5000).collect::<Vec<u32>>()), None);
        let mut sep: Vec<u32> = (0..300).collect();
        sep.extend([42; LOOP_MIN_TOKENS - 1]);
        sep.extend(300..600);
        assert_eq!(loop_at(&sep), None);
        let wide: Vec<u32> = (0..5000).map(|i| (i % 100) as u32).collect();
        assert_eq!(loop_at(&wide), None);
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
