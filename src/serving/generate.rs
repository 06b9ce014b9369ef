//! One generation without a server: a [`Generation`] runs a single sequence through a
//! scheduler of its own (the same batched forward pass and paged cache the server uses,
//! with a pool sized for this sequence), as an iterator of text pieces, so callers
//! stream as tokens appear and cancel by dropping it; [`Generation::summary`] gives
//! Ollama's counts and timings.

use super::blocks::BlockPool;
use super::sampling::Options;
use super::scheduler::{Advance, Limits, Scheduler, Sequence, Then};
use super::sequence::{Decoding, Piece, Summary};
use crate::model::qwen2::{PagedKv, KV_BLOCK};
use crate::model::{grammar, EngineError, Model, TextCodec};
use std::collections::VecDeque;

/// Tokens pushed through the model per forward pass while prefilling (Ollama's num_batch).
pub const PREFILL_CHUNK: usize = 512;

/// The sequence of a [`Generation`]: its decoding and the pieces not yet taken.
struct Alone<'m> {
    codec: &'m TextCodec,
    decoding: Decoding,
    pieces: VecDeque<Result<Piece, EngineError>>,
}

impl Sequence for Alone<'_> {
    fn admitted(&mut self, cached: usize) {
        self.decoding.admitted(cached);
    }

    fn advance(&mut self, tokens: &[u32], logits: &[f32]) -> Advance {
        match self.decoding.advance(self.codec, tokens, logits) {
            Ok((piece, advance)) => {
                self.pieces.extend(piece.map(Ok));
                advance
            }
            Err(e) => {
                self.pieces.push_back(Err(e));
                Advance {
                    token: None,
                    then: Then::Finish,
                }
            }
        }
    }
}

/// Runs a scheduler's step on `model` with `kv`: the forward pass of its batch and the
/// logits of the rows it asked for, on the host.
pub fn step_on<S: Sequence>(
    model: &Model,
    sched: &mut Scheduler<S>,
    kv: &mut PagedKv,
) -> Result<(Vec<S>, super::scheduler::StepReport), EngineError> {
    step_checked(model, sched, kv, || Ok(()))
}

/// As [`step_on`], with `check` run after the forward pass and before any sequence
/// sees its logits: an error there (the weights turned out unreadable) ends the step
/// with nothing handed out.
pub fn step_checked<S: Sequence>(
    model: &Model,
    sched: &mut Scheduler<S>,
    kv: &mut PagedKv,
    check: impl FnOnce() -> Result<(), EngineError>,
) -> Result<(Vec<S>, super::scheduler::StepReport), EngineError> {
    let started = std::time::Instant::now();
    let result = sched.step(|batch| -> Result<Vec<Vec<f32>>, EngineError> {
        let logits = model.weights.forward_batch(batch, kv)?;
        check()?;
        let rows = logits.dim(0)?;
        let host = logits.to_device(&candle_core::Device::Cpu)?;
        (0..rows)
            .map(|r| Ok(host.get(r)?.to_vec1::<f32>()?))
            .collect()
    });
    if let Ok((_, report)) = &result {
        let took = started.elapsed();
        sched.pace(report, took);
        tracing::debug!(
            model = %model.name,
            sequences = report.sequences,
            decodes = report.decodes,
            rows = report.tokens,
            budget = sched.budget(),
            ms = took.as_secs_f64() * 1e3,
            "step"
        );
    }
    result
}

pub struct Generation<'m> {
    model: &'m Model,
    sched: Scheduler<Alone<'m>>,
    kv: PagedKv,
    /// The sequence until the first step hands it to the scheduler.
    unstarted: Option<(Vec<u32>, Alone<'m>)>,
    /// The sequence once it has finished.
    ended: Option<Alone<'m>>,
    failed: bool,
}

impl<'m> Generation<'m> {
    pub(super) fn new(
        model: &'m Model,
        prompt: Vec<u32>,
        opts: &Options,
    ) -> Result<Self, EngineError> {
        let max = model.weights.max_positions();
        let (decoding, tokens) = Decoding::new(prompt, opts, max, &model.name)?;
        // Blocks for the prompt and the answer, bounded by the context.
        let num_ctx = opts.num_ctx.min(max).max(2);
        let positions = match usize::try_from(opts.num_predict) {
            Ok(n) => (tokens.len() + n + 1).min(num_ctx),
            Err(_) => num_ctx,
        };
        let n_blocks = (positions + 1).div_ceil(KV_BLOCK);
        let kv = model.weights.new_paged_kv(n_blocks)?;
        let sched = Scheduler::new(
            BlockPool::new(n_blocks, KV_BLOCK),
            Limits {
                max_running: 1,
                step_tokens: PREFILL_CHUNK,
                step_time: None,
            },
        );
        let alone = Alone {
            codec: &model.codec,
            decoding,
            pieces: VecDeque::new(),
        };
        Ok(Self {
            model,
            sched,
            kv,
            unstarted: Some((tokens, alone)),
            ended: None,
            failed: false,
        })
    }

    fn decoding(&mut self) -> &Decoding {
        if let Some((_, a)) = &self.unstarted {
            return &a.decoding;
        }
        match &mut self.ended {
            Some(a) => &a.decoding,
            None => {
                &self
                    .sched
                    .sequences_mut()
                    .next()
                    .expect("a generation has its sequence")
                    .decoding
            }
        }
    }

    /// Changes the decoding before anything runs (the builder methods below).
    fn map(mut self, f: impl FnOnce(Decoding) -> Decoding) -> Self {
        if let Some((tokens, a)) = self.unstarted.take() {
            let Alone {
                codec,
                decoding,
                pieces,
            } = a;
            let a = Alone {
                codec,
                decoding: f(decoding),
                pieces,
            };
            self.unstarted = Some((tokens, a));
        }
        self
    }

    /// Reports each generated token's log probability with `top` alternatives.
    pub fn with_logprobs(self, top: usize) -> Self {
        self.map(|d| d.with_logprobs(top))
    }

    /// Keeps the output to `constraint`'s grammar.
    pub fn with_constraint(self, constraint: grammar::Constraint) -> Self {
        self.map(|d| d.with_constraint(constraint))
    }

    /// Keeps generating past end-of-turn tokens (for fixed-length benchmarks).
    pub fn ignore_stop_tokens(self) -> Self {
        self.map(|d| d.ignore_stop_tokens())
    }

    /// Tokens generated so far.
    pub fn generated(&mut self) -> &[u32] {
        self.decoding().generated()
    }

    pub fn is_done(&mut self) -> bool {
        self.ended.is_some()
    }

    /// Counts and timings; `done_reason` is `length` if called before the end.
    pub fn summary(&mut self) -> Summary {
        let mut s = self.decoding().summary();
        s.load_duration = self.model.load_duration;
        s
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

impl Iterator for Generation<'_> {
    type Item = Result<Piece, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if let Some((tokens, a)) = self.unstarted.take() {
                if let Err((e, _)) = self.sched.add(tokens, a) {
                    self.failed = true;
                    return Some(Err(EngineError::Option(e.to_string())));
                }
            }
            let queued = match &mut self.ended {
                Some(a) => return a.pieces.pop_front(),
                None => self.sched.sequences_mut().next()?.pieces.pop_front(),
            };
            if let Some(p) = queued {
                return Some(p);
            }
            match step_on(self.model, &mut self.sched, &mut self.kv) {
                Ok((mut done, _)) => self.ended = done.pop().or(self.ended.take()),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
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
