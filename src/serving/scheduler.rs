//! Continuous batching for one model: many sequences share each forward pass. Every
//! step packs the next token of each running sequence (decodes first) and chunks of
//! prompts still being prefilled, under a per-step token budget, into one batch;
//! sequences join and leave between steps. Blocks of the paged KV cache come from a
//! [`BlockPool`]: a new prompt starts with whatever cached blocks match its start (the
//! prefix cache), and when the pool runs out the newest running sequence is preempted
//! (its blocks freed, its tokens kept) and recomputed later. Nothing here knows the
//! model: the forward pass is a closure, so this is unit-tested with a fake one.

use super::blocks::{BlockPool, BlockTable};
use crate::model::qwen2::SeqChunk;
use std::collections::VecDeque;

/// What a sequence does after the logits of its last position.
#[derive(Debug, Clone, PartialEq)]
pub enum Then {
    /// Keep going: the token appended is the next to run.
    Continue,
    /// Finished: the sequence leaves and its blocks return to the pool (full ones stay
    /// in the prefix cache).
    Finish,
    /// The context is full: drop `discard` tokens after the first `keep` and recompute
    /// the rest (Ollama's context shift).
    Shift { keep: usize, discard: usize },
}

/// A sequence's answer to its logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Advance {
    /// A token to append to the sequence's context.
    pub token: Option<u32>,
    pub then: Then,
}

/// One request's sequence as the scheduler drives it.
pub trait Sequence {
    /// The sequence starts running with `cached` prompt positions from the prefix cache
    /// (called again if it resumes after a preemption).
    fn admitted(&mut self, cached: usize);
    /// The logits of the last position of `tokens` (the whole context so far).
    fn advance(&mut self, tokens: &[u32], logits: &[f32]) -> Advance;
    /// The client went away: the sequence leaves at the next step.
    fn cancelled(&self) -> bool {
        false
    }
    /// A sequence that scores its prompt (the log-probability of each given token, as
    /// when a draft is audited) names the first position it scores: the logits of every
    /// row from the one before it go to [`observe`](Self::observe), and the prefix cache
    /// never skips those rows.
    fn scores_from(&self) -> Option<usize> {
        None
    }
    /// The logits of position `at` of `tokens`, a prompt row before the last, for a
    /// sequence that scores.
    fn observe(&mut self, _tokens: &[u32], _at: usize, _logits: &[f32]) {}
}

/// How many of the last rows of `tokens[from..to]` need logits: the last position's,
/// and every row a scoring sequence observes.
fn rows_wanted(scores_from: Option<usize>, from: usize, to: usize, len: usize) -> usize {
    let last = usize::from(to == len);
    match scores_from {
        Some(s) => to.saturating_sub(from.max(s.saturating_sub(1))).max(last),
        None => last,
    }
}

/// Positions before it up to which a prompt chunk of a paced scheduler may take the
/// whole step budget. Each row of a chunk attends to every position before it, so late in
/// a long prompt a chunk of the full budget costs many times one near its start (at 4,096
/// positions, a 256-row chunk took seconds on 2 cores), and a request arriving meanwhile
/// waits for that step. Past this context a chunk shrinks so that rows × positions stays
/// what a full chunk costs here, down to [`MIN_CHUNK`], below the budget's floor: deep in
/// a long prompt a step stays short even where the floor's rows would take too long.
const ATTENTION_CONTEXT: usize = 512;
/// The smallest chunk a prompt is read in, however long its context.
const MIN_CHUNK: usize = 16;

/// The largest chunk at `computed` whose rows × positions (`c × (computed + c)`) stays
/// within `pairs`, at least [`MIN_CHUNK`].
fn chunk_within(computed: usize, pairs: usize) -> usize {
    let (c, p) = (computed as f64, pairs as f64);
    let chunk = ((c * c + 4.0 * p).sqrt() - c) / 2.0;
    (chunk as usize).max(MIN_CHUNK)
}

/// The budget a paced scheduler starts from before it has timed a full step: small
/// enough that the first step of a long prompt on a slow device is short.
const PACED_START: usize = 64;
/// The smallest budget pacing goes down to: below it the matrices run far from full
/// speed and a long prompt would crawl.
const PACED_FLOOR: usize = 32;

/// How a scheduler packs its steps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences running at once (`--parallel`).
    pub max_running: usize,
    /// Tokens per step at most, prompt chunks and decodes together (decodes always run).
    pub step_tokens: usize,
    /// The time a step that reads prompts should take. When set, the step's token budget
    /// follows the measured times of such steps (see [`Scheduler::pace`]), so that a
    /// request arriving during a long prompt waits about this long for its turn, on a
    /// slow CPU as on a GPU; when not (one generation alone), every step may use
    /// `step_tokens`.
    pub step_time: Option<std::time::Duration>,
}

struct Entry<S> {
    seq: S,
    tokens: Vec<u32>,
    /// Positions whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
}

/// What a step did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepReport {
    /// Sequences in the batch, and how many of them decoded one token.
    pub sequences: usize,
    pub decodes: usize,
    /// Rows the forward pass ran.
    pub tokens: usize,
    /// Prompt positions that newly admitted sequences took from the prefix cache.
    pub prefix_hit_tokens: usize,
    /// Sequences preempted to free blocks.
    pub preempted: usize,
    /// A prompt chunk was as large as the budget allowed (a step whose time tells what
    /// the budget costs); false when the step had room to spare or gave way to others.
    pub budget_bound: bool,
}

/// Why a sequence cannot be added.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AddError {
    #[error("a sequence needs at least one token")]
    Empty,
    #[error("{0} positions do not fit the KV cache of {1} positions")]
    TooLong(usize, usize),
}

pub struct Scheduler<S> {
    pool: BlockPool,
    limits: Limits,
    /// Tokens the next step may take (`limits.step_tokens` unless paced).
    budget: usize,
    waiting: VecDeque<Entry<S>>,
    running: Vec<Entry<S>>,
}

impl<S: Sequence> Scheduler<S> {
    pub fn new(pool: BlockPool, limits: Limits) -> Self {
        let step_tokens = limits.step_tokens.max(1);
        Self {
            pool,
            limits: Limits {
                max_running: limits.max_running.max(1),
                step_tokens,
                ..limits
            },
            budget: match limits.step_time {
                Some(_) => PACED_START.min(step_tokens),
                None => step_tokens,
            },
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Positions one sequence may hold: the whole pool.
    pub fn capacity(&self) -> usize {
        self.pool.n_blocks() * self.pool.block_size()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Tokens the next step may take.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Tells a paced scheduler how long a step took. After a step that the budget bound,
    /// the budget moves toward the one that takes `step_time`: by the square root of
    /// the ratio (a damped step, as the cost is not quite proportional to the rows),
    /// within [`PACED_FLOOR`] and `step_tokens`.
    pub fn pace(&mut self, report: &StepReport, took: std::time::Duration) {
        let Some(target) = self.limits.step_time else {
            return;
        };
        if !report.budget_bound || took.is_zero() {
            return;
        }
        let factor = (target.as_secs_f64() / took.as_secs_f64())
            .sqrt()
            .clamp(0.5, 2.0);
        let floor = PACED_FLOOR.min(self.limits.step_tokens);
        self.budget =
            ((self.budget as f64 * factor).round() as usize).clamp(floor, self.limits.step_tokens);
    }

    /// Queues a sequence whose context so far is `tokens` (or gives it back, refused).
    pub fn add(&mut self, tokens: Vec<u32>, seq: S) -> Result<(), (AddError, S)> {
        if tokens.is_empty() {
            return Err((AddError::Empty, seq));
        }
        // Room for the prompt and one generated token.
        if tokens.len() + 1 > self.capacity() {
            return Err((AddError::TooLong(tokens.len() + 1, self.capacity()), seq));
        }
        self.waiting.push_back(Entry {
            seq,
            tokens,
            computed: 0,
            table: BlockTable::default(),
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Every sequence, running or waiting.
    pub fn sequences_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.running
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .map(|e| &mut e.seq)
    }

    /// Takes every sequence out (after a failed forward pass), freeing their blocks.
    pub fn drain(&mut self) -> Vec<S> {
        let mut out = Vec::new();
        for mut e in self.running.drain(..).chain(self.waiting.drain(..)) {
            e.table.release(&mut self.pool);
            out.push(e.seq);
        }
        out
    }

    /// Back to the waiting queue's front with its tokens: recomputed when readmitted.
    fn requeue(&mut self, mut e: Entry<S>) {
        e.table.release(&mut self.pool);
        e.computed = 0;
        self.waiting.push_front(e);
    }

    /// Drops cancelled sequences wherever they are.
    fn drop_cancelled(&mut self) -> Vec<S> {
        let mut gone = Vec::new();
        let mut keep_running = Vec::with_capacity(self.running.len());
        for mut e in self.running.drain(..) {
            if e.seq.cancelled() {
                e.table.release(&mut self.pool);
                gone.push(e.seq);
            } else {
                keep_running.push(e);
            }
        }
        self.running = keep_running;
        let mut keep_waiting = VecDeque::with_capacity(self.waiting.len());
        for e in self.waiting.drain(..) {
            if e.seq.cancelled() {
                gone.push(e.seq);
            } else {
                keep_waiting.push_back(e);
            }
        }
        self.waiting = keep_waiting;
        gone
    }

    /// Plans a step: (index into `running`, first position, end) per chunk.
    fn plan(&mut self, report: &mut StepReport) -> Vec<(usize, usize, usize)> {
        let mut budget = self.budget;
        let mut plan = Vec::new();
        // Decodes first: each running sequence that has computed all but its last
        // token needs a slot for it, preempting the newest sequences if the pool is dry.
        let mut i = 0;
        while i < self.running.len() {
            let e = &self.running[i];
            if e.computed + 1 != e.tokens.len() {
                i += 1;
                continue;
            }
            let need = e.tokens.len();
            loop {
                if self.running[i].table.reserve(&mut self.pool, need) {
                    plan.push((i, need - 1, need));
                    budget = budget.saturating_sub(1);
                    i += 1;
                    break;
                }
                // Preempt the newest: the sequence itself when it is the newest.
                let victim = self.running.pop().expect("a running sequence");
                report.preempted += 1;
                plan.retain(|&(j, _, _)| j < self.running.len());
                self.requeue(victim);
                if i >= self.running.len() {
                    break;
                }
            }
        }
        // New sequences, first come first served, while there is room: each with blocks
        // for its whole prompt, starting from what the prefix cache holds. They join
        // before the prompts being read take the budget, so a short request arriving
        // during a long prompt's prefill starts at the next step, not after it.
        while budget > 0 && self.running.len() < self.limits.max_running {
            let Some(mut e) = self.waiting.pop_front() else {
                break;
            };
            // At least the last position runs (its logits), and every row a scoring
            // sequence observes.
            let reuse = match e.seq.scores_from() {
                Some(s) => s.saturating_sub(1),
                None => e.tokens.len() - 1,
            };
            let (table, cached) = BlockTable::with_prefix(&mut self.pool, &e.tokens, reuse);
            e.table = table;
            if !e.table.reserve(&mut self.pool, e.tokens.len()) {
                e.table.release(&mut self.pool);
                self.waiting.push_front(e);
                break;
            }
            e.computed = cached;
            report.prefix_hit_tokens += cached;
            e.seq.admitted(cached);
            self.running.push(e);
        }
        // Prompts being read, the shortest remainder first: a long prompt takes what the
        // short ones leave (never nothing for long: at most `max_running` share a step).
        let mut reading: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let e = &self.running[i];
                e.computed < e.tokens.len() && !plan.iter().any(|&(j, _, _)| j == i)
            })
            .collect();
        reading.sort_by_key(|&i| (self.running[i].tokens.len() - self.running[i].computed, i));
        let pairs = self.budget.saturating_mul(ATTENTION_CONTEXT);
        let mut gave_way = false;
        for i in reading {
            if budget == 0 {
                report.budget_bound = true;
                break;
            }
            let e = &self.running[i];
            let mut take = match self.limits.step_time {
                Some(_) => budget.min(chunk_within(e.computed, pairs)),
                // Nobody waits for a step of an unpaced scheduler (one generation
                // alone): whole budgets, the fewest steps.
                None => budget,
            };
            let rest = e.tokens.len() - e.computed;
            if !plan.is_empty() && rest > take && rest > self.budget {
                // Part of a prompt longer than a step, beside others (decodes, a
                // newcomer's prompt): a smaller part, so that their next token is not
                // held behind it. (Prompts of a burst, each shorter, go as before.)
                take = take.min((self.budget / 4).max(MIN_CHUNK));
                gave_way = true;
            }
            report.budget_bound |= rest > take;
            let end = e.tokens.len().min(e.computed + take);
            budget -= end - e.computed;
            plan.push((i, e.computed, end));
        }
        report.budget_bound &= !gave_way;
        plan
    }

    /// Runs one step: plans the batch, calls `forward` with it (which returns the logits
    /// of each chunk that asks for them, in order), then lets each sequence act on its
    /// logits. Returns the sequences that finished or were cancelled, with the report.
    pub fn step<E>(
        &mut self,
        forward: impl FnOnce(&[SeqChunk]) -> Result<Vec<Vec<f32>>, E>,
    ) -> Result<(Vec<S>, StepReport), E> {
        let mut done = self.drop_cancelled();
        let mut report = StepReport::default();
        let plan = self.plan(&mut report);
        if plan.is_empty() {
            return Ok((done, report));
        }
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .map(|&(i, from, to)| {
                let e = &self.running[i];
                SeqChunk {
                    tokens: &e.tokens[from..to],
                    start: from,
                    blocks: &e.table.blocks,
                    logits: rows_wanted(e.seq.scores_from(), from, to, e.tokens.len()),
                }
            })
            .collect();
        report.sequences = chunks.len();
        report.decodes = plan
            .iter()
            .filter(|&&(_, f, t)| t - f == 1 && f > 0)
            .count();
        report.tokens = chunks.iter().map(|c| c.tokens.len()).sum();
        let wanted: Vec<usize> = chunks.iter().map(|c| c.logits).collect();
        let logits = forward(&chunks)?;
        assert_eq!(
            logits.len(),
            wanted.iter().sum::<usize>(),
            "the forward pass returned other rows"
        );
        let mut logits = logits.into_iter();
        let mut finished = vec![];
        let mut shifted = vec![];
        for (&(i, _, to), &rows) in plan.iter().zip(&wanted) {
            let e = &mut self.running[i];
            e.computed = to;
            e.table.seal_full(&mut self.pool, &e.tokens, e.computed);
            // Rows before the last position: a scoring sequence's observations.
            let observed = rows - usize::from(to == e.tokens.len());
            for at in to - rows..to - rows + observed {
                let l = logits.next().expect("counted");
                e.seq.observe(&e.tokens, at, &l);
            }
            if to < e.tokens.len() {
                continue;
            }
            let l = logits.next().expect("counted");
            let a = e.seq.advance(&e.tokens, &l);
            if let Some(t) = a.token {
                e.tokens.push(t);
            }
            match a.then {
                Then::Continue if a.token.is_some() => {}
                Then::Continue | Then::Finish => finished.push(i),
                Then::Shift { keep, discard } => {
                    let keep = keep.min(e.tokens.len());
                    let discard = discard.min(e.tokens.len() - keep);
                    e.tokens.drain(keep..keep + discard);
                    shifted.push(i);
                }
            }
        }
        // Leave in descending index order so the indices stay valid.
        let mut leaving: Vec<(usize, bool)> = finished
            .into_iter()
            .map(|i| (i, true))
            .chain(shifted.into_iter().map(|i| (i, false)))
            .collect();
        leaving.sort_unstable_by_key(|l| std::cmp::Reverse(l.0));
        for (i, finish) in leaving {
            let mut e = self.running.remove(i);
            if finish {
                e.table.release(&mut self.pool);
                done.push(e.seq);
            } else {
                self.requeue(e);
            }
        }
        Ok((done, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A sequence that generates `n` tokens, each the previous plus one, and logs what
    /// happened to it.
    #[derive(Debug)]
    struct Counting {
        left: usize,
        cached: Vec<usize>,
        seen: Log,
        name: u32,
        cancel: Rc<RefCell<bool>>,
        shift_at: Option<usize>,
        /// Scores its prompt from this position: the rows it observed, in order.
        scores_from: Option<usize>,
        observed: Vec<usize>,
    }

    impl Sequence for Counting {
        fn scores_from(&self) -> Option<usize> {
            self.scores_from
        }
        fn observe(&mut self, tokens: &[u32], at: usize, logits: &[f32]) {
            assert_eq!(logits, [tokens[at] as f32, (at + 1) as f32]);
            self.observed.push(at);
        }
        fn admitted(&mut self, cached: usize) {
            self.cached.push(cached);
        }
        fn advance(&mut self, tokens: &[u32], logits: &[f32]) -> Advance {
            // The fake forward's logits: [last token, position count].
            assert_eq!(
                logits,
                [*tokens.last().unwrap() as f32, tokens.len() as f32]
            );
            self.seen.borrow_mut().push((self.name, tokens.to_vec()));
            self.left -= 1;
            if self.shift_at == Some(tokens.len()) {
                self.shift_at = None;
                return Advance {
                    token: Some(tokens.last().unwrap() + 1),
                    then: Then::Shift {
                        keep: 1,
                        discard: 2,
                    },
                };
            }
            Advance {
                token: Some(tokens.last().unwrap() + 1),
                then: if self.left == 0 {
                    Then::Finish
                } else {
                    Then::Continue
                },
            }
        }
        fn cancelled(&self) -> bool {
            *self.cancel.borrow()
        }
    }

    type Log = Rc<RefCell<Vec<(u32, Vec<u32>)>>>;

    fn seq(name: u32, n: usize, log: &Log) -> Counting {
        Counting {
            left: n,
            cached: vec![],
            seen: log.clone(),
            name,
            cancel: Rc::new(RefCell::new(false)),
            shift_at: None,
            scores_from: None,
            observed: vec![],
        }
    }

    /// A fake model: checks every chunk against what the sequence wrote before (a
    /// per-block store of tokens), stores its tokens, returns [last token, positions].
    struct FakeModel {
        store: Vec<Option<u32>>,
        block: usize,
        batches: Vec<Vec<(usize, usize)>>,
    }

    impl FakeModel {
        fn new(n_blocks: usize, block: usize) -> Self {
            Self {
                store: vec![None; n_blocks * block],
                block,
                batches: vec![],
            }
        }
        fn forward(&mut self, chunks: &[SeqChunk]) -> Result<Vec<Vec<f32>>, String> {
            let mut out = vec![];
            self.batches
                .push(chunks.iter().map(|c| (c.start, c.tokens.len())).collect());
            for c in chunks {
                let slot =
                    |p: usize| c.blocks[p / self.block] as usize * self.block + p % self.block;
                for p in 0..c.start {
                    if self.store[slot(p)].is_none() {
                        return Err(format!("position {p} read before written"));
                    }
                }
                for (i, &t) in c.tokens.iter().enumerate() {
                    self.store[slot(c.start + i)] = Some(t);
                }
                // Row r's logits: [its token, positions up to it].
                let end = c.start + c.tokens.len();
                for r in end - c.logits..end {
                    out.push(vec![c.tokens[r - c.start] as f32, (r + 1) as f32]);
                }
            }
            Ok(out)
        }
        /// The tokens a sequence's blocks hold for its first `len` positions.
        fn read(&self, blocks: &[u32], len: usize) -> Vec<u32> {
            (0..len)
                .map(|p| {
                    self.store[blocks[p / self.block] as usize * self.block + p % self.block]
                        .unwrap()
                })
                .collect()
        }
    }

    fn limits(max_running: usize, step_tokens: usize) -> Limits {
        Limits {
            max_running,
            step_tokens,
            step_time: None,
        }
    }

    fn run_all(s: &mut Scheduler<Counting>, m: &mut FakeModel) -> Vec<StepReport> {
        let mut reports = vec![];
        for _ in 0..1000 {
            if s.is_empty() {
                return reports;
            }
            let (_, r) = s.step(|c| m.forward(c)).unwrap();
            reports.push(r);
        }
        panic!("did not finish");
    }

    #[test]
    fn decodes_of_several_sequences_share_steps_and_prompts_are_chunked() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(16, 4), limits(4, 8));
        let mut m = FakeModel::new(16, 4);
        s.add((100..110).collect(), seq(1, 3, &log)).unwrap();
        s.add((200..203).collect(), seq(2, 3, &log)).unwrap();
        let reports = run_all(&mut s, &mut m);
        // Step 1: the second prompt's three positions (the shorter first), then five of
        // the first one's ten (the rest of the budget of 8). Step 2: the second decodes,
        // the first reads its last five. Then both decode together.
        assert_eq!(m.batches[0], vec![(0, 3), (0, 5)]);
        assert_eq!(m.batches[1], vec![(3, 1), (5, 5)]);
        assert_eq!(m.batches[2], vec![(10, 1), (4, 1)]);
        assert_eq!(reports[2].decodes, 2);
        // Each sequence saw its own tokens, each new one its last plus one.
        let log = log.borrow();
        let of = |n| {
            log.iter()
                .filter(|(s, _)| *s == n)
                .map(|(_, t)| t.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(of(1).last().unwrap()[8..], [108, 109, 110, 111]);
        assert_eq!(of(2).last().unwrap(), &vec![200, 201, 202, 203, 204]);
        assert_eq!(s.pool().free_blocks(), 16);
    }

    #[test]
    fn a_scoring_sequence_sees_every_row_it_scores_once_however_chunked_or_cached() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(16, 4), limits(4, 8));
        let mut m = FakeModel::new(16, 4);
        // A 14-token context is computed once: its full blocks stay in the prefix cache.
        let context: Vec<u32> = (100..114).collect();
        s.add(context.clone(), seq(1, 1, &log)).unwrap();
        run_all(&mut s, &mut m);
        // Scoring tokens 6.. of the same context: rows 5..13 run again although blocks
        // of 12 positions are cached, in chunks of the budget of 8, each seen once, the
        // last position's through `advance`.
        let mut scoring = seq(2, 1, &log);
        scoring.scores_from = Some(6);
        s.add(context.clone(), scoring).unwrap();
        let mut done = vec![];
        while !s.is_empty() {
            let (d, _) = s.step(|c| m.forward(c)).unwrap();
            done.extend(d);
        }
        assert_eq!(
            m.batches[m.batches.len() - 2..],
            [vec![(4, 8)], vec![(12, 2)]]
        );
        assert_eq!(done[0].cached, vec![4]);
        assert_eq!(done[0].observed, (5..13).collect::<Vec<_>>());
        assert_eq!(log.borrow().last().unwrap(), &(2, context));
        assert_eq!(s.pool().free_blocks(), 16);
    }

    #[test]
    fn a_short_prompt_is_not_held_behind_a_long_prefill() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(64, 4), limits(4, 8));
        let mut m = FakeModel::new(64, 4);
        // A 100-token prompt takes the whole budget of its first step...
        s.add((0..100).collect(), seq(1, 2, &log)).unwrap();
        s.step(|c| m.forward(c)).unwrap();
        assert_eq!(m.batches[0], vec![(0, 8)]);
        // ...a 3-token prompt arriving then is read at the next step, and answers at
        // once, while the long one goes on with the rest of the budget.
        s.add(vec![500, 501, 502], seq(2, 2, &log)).unwrap();
        s.step(|c| m.forward(c)).unwrap();
        assert_eq!(m.batches[1], vec![(0, 3), (8, 5)]);
        assert_eq!(
            log.borrow()[0].0,
            2,
            "the short request's first token came first"
        );
        s.step(|c| m.forward(c)).unwrap();
        assert_eq!(m.batches[2], vec![(3, 1), (13, 7)]);
        run_all(&mut s, &mut m);
        assert_eq!(s.pool().free_blocks(), 64);
    }

    #[test]
    fn chunks_of_a_long_prompt_shrink_so_each_step_costs_about_the_same() {
        let log: Log = Default::default();
        let len = 4096;
        // Paced (here never told a time: the budget stays where it starts).
        let mut s = Scheduler::new(BlockPool::new(300, 16), paced(256, 400));
        let mut m = FakeModel::new(300, 16);
        s.add((0..len as u32).collect(), seq(1, 1, &log)).unwrap();
        run_all(&mut s, &mut m);
        let chunks: Vec<(usize, usize)> = m.batches.iter().map(|b| b[0]).collect();
        // Whole budgets while the context is short...
        assert_eq!(chunks[..2], [(0, PACED_START), (PACED_START, PACED_START)]);
        // ...then smaller chunks, each within the attention work of a full one there.
        let pairs = PACED_START * ATTENTION_CONTEXT;
        for &(start, n) in &chunks {
            assert!(
                n * (start + n) <= pairs || n == MIN_CHUNK,
                "{n} rows at {start}"
            );
        }
        assert!(chunks
            .iter()
            .any(|&(start, n)| start > 3000 && n == MIN_CHUNK));
        assert_eq!(chunks.iter().map(|c| c.1).sum::<usize>(), len);
        // Unpaced (one generation alone, nobody waiting): whole budgets throughout.
        let mut s = Scheduler::new(BlockPool::new(300, 16), limits(4, 256));
        let mut m = FakeModel::new(300, 16);
        s.add((0..len as u32).collect(), seq(1, 1, &log)).unwrap();
        run_all(&mut s, &mut m);
        assert!(m
            .batches
            .iter()
            .all(|b| b[0].1 == 256 || b[0].0 + b[0].1 == len));
    }

    #[test]
    fn a_long_prompt_takes_a_quarter_of_a_step_it_shares() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(64, 16), limits(4, 256));
        let mut m = FakeModel::new(64, 16);
        s.add((0..600).collect(), seq(1, 1, &log)).unwrap();
        s.step(|c| m.forward(c)).unwrap();
        assert_eq!(m.batches[0], vec![(0, 256)]);
        // A newcomer's whole prompt, and 64 more of the long one beside it.
        s.add((1000..1030).collect(), seq(2, 3, &log)).unwrap();
        s.step(|c| m.forward(c)).unwrap();
        assert_eq!(m.batches[1], vec![(0, 30), (256, 64)]);
        // Beside the newcomer's decodes too; alone again, the whole budget.
        s.step(|c| m.forward(c)).unwrap();
        assert_eq!(m.batches[2], vec![(30, 1), (320, 64)]);
        run_all(&mut s, &mut m);
        assert!(m.batches.iter().any(|b| b.len() == 1 && b[0].1 > 64));
        assert_eq!(s.pool().free_blocks(), 64);
    }

    /// A paced scheduler's steps on a device whose step costs `fixed` + `per_row` × rows
    /// (ms), plus attention: a row at 512 positions costs as much again. The budget after
    /// each step, and each step's cost.
    fn paced_run(
        s: &mut Scheduler<Counting>,
        m: &mut FakeModel,
        fixed: f64,
        per_row: f64,
    ) -> Vec<(usize, f64)> {
        let mut out = vec![];
        while !s.is_empty() {
            let (_, r) = s.step(|c| m.forward(c)).unwrap();
            let pairs: usize = m
                .batches
                .last()
                .unwrap()
                .iter()
                .map(|&(at, n)| n * (at + n))
                .sum();
            let ms = fixed + per_row * (r.tokens as f64 + pairs as f64 / 512.0);
            s.pace(&r, std::time::Duration::from_secs_f64(ms / 1e3));
            out.push((s.budget(), ms));
        }
        out
    }

    fn paced(step_tokens: usize, ms: u64) -> Limits {
        Limits {
            step_time: Some(std::time::Duration::from_millis(ms)),
            ..limits(4, step_tokens)
        }
    }

    #[test]
    fn a_paced_budget_settles_where_a_step_takes_the_target_time() {
        let log: Log = Default::default();
        // A slow device: 20 ms a step and 4 ms a row, and attention that grows with the
        // context.
        let mut s = Scheduler::new(BlockPool::new(128, 16), paced(256, 400));
        let mut m = FakeModel::new(128, 16);
        assert_eq!(s.budget(), PACED_START);
        s.add((0..1500).collect(), seq(1, 1, &log)).unwrap();
        let steps = paced_run(&mut s, &mut m, 20.0, 4.0);
        // The first step is short; then every step takes about the target, however
        // deep in the prompt (unpaced, a step of 256 rows here takes 1.2 s and more).
        let (first, last) = (steps[0].1, steps.last().unwrap().1);
        assert!(first < 400.0 && last < 400.0, "{steps:?}");
        let rest = &steps[1..steps.len() - 1];
        assert!(
            rest.iter().all(|&(_, ms)| (350.0..=480.0).contains(&ms)),
            "{steps:?}"
        );
        // A fast device: the budget grows to the most a step may take.
        let mut s = Scheduler::new(BlockPool::new(128, 16), paced(256, 400));
        s.add((0..1500).collect(), seq(1, 1, &log)).unwrap();
        let steps = paced_run(&mut s, &mut FakeModel::new(128, 16), 5.0, 0.1);
        assert_eq!(steps.last().unwrap().0, 256, "{steps:?}");
        // Unpaced, the budget is the whole step, and times change nothing.
        let mut s = Scheduler::new(BlockPool::new(128, 16), limits(4, 256));
        s.add((0..600).collect(), seq(1, 1, &log)).unwrap();
        let steps = paced_run(&mut s, &mut FakeModel::new(128, 16), 20.0, 40.0);
        assert!(steps.iter().all(|&(b, _)| b == 256), "{steps:?}");
    }

    #[test]
    fn steps_that_leave_room_or_give_way_do_not_move_the_budget() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(128, 16), paced(256, 400));
        let mut m = FakeModel::new(128, 16);
        // Short prompts and their decodes: never bound by the budget.
        for n in 0..3 {
            s.add((n * 100..n * 100 + 20).collect(), seq(n, 3, &log))
                .unwrap();
        }
        let steps = paced_run(&mut s, &mut m, 20.0, 100.0);
        assert!(steps.iter().all(|&(b, _)| b == PACED_START), "{steps:?}");
        // A long prompt beside a decoding sequence takes a smaller part (giving way):
        // cheap steps that say nothing of what the budget costs.
        s.add((0..20).collect(), seq(7, 40, &log)).unwrap();
        s.add((1000..1600).collect(), seq(8, 1, &log)).unwrap();
        s.step(|c| m.forward(c)).unwrap();
        let (_, r) = s.step(|c| m.forward(c)).unwrap();
        assert!(!r.budget_bound && r.decodes == 1, "{r:?}");
        s.pace(&r, std::time::Duration::from_millis(1));
        assert_eq!(s.budget(), PACED_START);
    }

    #[test]
    fn a_repeated_prompt_starts_from_the_cached_blocks() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(16, 4), limits(4, 64));
        let mut m = FakeModel::new(16, 4);
        let prompt: Vec<u32> = (0..10).collect();
        s.add(prompt.clone(), seq(1, 2, &log)).unwrap();
        run_all(&mut s, &mut m);
        // A second turn: the first prompt, its answer, one more token.
        let mut second = prompt.clone();
        second.extend([10, 11, 50]);
        s.add(second.clone(), seq(2, 1, &log)).unwrap();
        let r = run_all(&mut s, &mut m);
        // The first sequence computed 11 positions (its last token was never run): its
        // two full blocks come from the cache.
        assert_eq!(r[0].prefix_hit_tokens, 8);
        assert_eq!(m.batches.last().unwrap(), &vec![(8, 5)]);
        // A prompt that is entirely cached still computes its last position.
        s.add((0..8).collect(), seq(3, 1, &log)).unwrap();
        let r = run_all(&mut s, &mut m);
        assert_eq!(r[0].prefix_hit_tokens, 4);
    }

    #[test]
    fn a_dry_pool_preempts_the_newest_and_every_sequence_still_finishes() {
        let log: Log = Default::default();
        // 6 blocks of 2 positions: room for 12 positions; three sequences want 5 each
        // at first and 10 each at the end.
        let mut s = Scheduler::new(BlockPool::new(6, 2), limits(3, 64));
        let mut m = FakeModel::new(6, 2);
        for n in 0..3 {
            s.add(vec![n * 10, n * 10 + 1, n * 10 + 2], seq(n, 7, &log))
                .unwrap();
        }
        let reports = run_all(&mut s, &mut m);
        assert!(reports.iter().map(|r| r.preempted).sum::<usize>() > 0);
        let log = log.borrow();
        for n in 0..3u32 {
            let last = log.iter().rfind(|(s, _)| *s == n).unwrap().1.clone();
            let want: Vec<u32> = [n * 10, n * 10 + 1]
                .into_iter()
                .chain(n * 10 + 2..n * 10 + 9)
                .collect();
            assert_eq!(last, want, "sequence {n} is complete and in order");
        }
        assert_eq!(s.pool().free_blocks(), 6);
    }

    #[test]
    fn parallel_bounds_the_running_sequences() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(32, 4), limits(2, 64));
        let mut m = FakeModel::new(32, 4);
        for n in 0..5 {
            s.add(vec![n], seq(n, 3, &log)).unwrap();
        }
        let reports = run_all(&mut s, &mut m);
        assert!(reports.iter().all(|r| r.sequences <= 2));
        assert_eq!(log.borrow().len(), 15);
    }

    #[test]
    fn a_cancelled_sequence_leaves_at_the_next_step() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(8, 4), limits(4, 64));
        let mut m = FakeModel::new(8, 4);
        let a = seq(1, 100, &log);
        let cancel = a.cancel.clone();
        s.add(vec![1, 2], a).unwrap();
        s.add(vec![3, 4], seq(2, 3, &log)).unwrap();
        s.step(|c| m.forward(c)).unwrap();
        *cancel.borrow_mut() = true;
        let (gone, _) = s.step(|c| m.forward(c)).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(m.batches.last().unwrap().len(), 1);
        run_all(&mut s, &mut m);
        assert_eq!(s.pool().free_blocks(), 8);
    }

    #[test]
    fn a_context_shift_recomputes_the_kept_tokens() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(8, 4), limits(4, 64));
        let mut m = FakeModel::new(8, 4);
        let mut a = seq(1, 3, &log);
        a.shift_at = Some(4);
        s.add(vec![1, 2, 3, 4], a).unwrap();
        run_all(&mut s, &mut m);
        let log = log.borrow();
        // [1,2,3,4] + 5, keep 1, drop 2: [1,4,5], recomputed, then 6 and 7.
        assert_eq!(log[1].1, vec![1, 4, 5]);
        assert_eq!(log[2].1, vec![1, 4, 5, 6]);
        assert_eq!(m.batches[1], vec![(0, 3)]);
    }

    #[test]
    fn what_the_model_reads_is_what_each_sequence_wrote() {
        // Interleaved sequences sharing a cached prefix: every position a chunk reads
        // holds the sequence's own token (FakeModel checks presence; this checks values).
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(12, 4), limits(3, 5));
        let mut m = FakeModel::new(12, 4);
        let base: Vec<u32> = (0..9).collect();
        s.add(base.clone(), seq(1, 2, &log)).unwrap();
        run_all(&mut s, &mut m);
        for n in 2..5u32 {
            let mut p = base.clone();
            p.push(100 * n);
            s.add(p, seq(n, 4, &log)).unwrap();
        }
        while !s.is_empty() {
            s.step(|c| m.forward(c)).unwrap();
            for e in &s.running {
                assert_eq!(m.read(&e.table.blocks, e.computed), e.tokens[..e.computed]);
            }
        }
        assert_eq!(s.limits.max_running, 3);
    }

    #[test]
    fn sequences_that_cannot_fit_are_refused() {
        let log: Log = Default::default();
        let mut s = Scheduler::new(BlockPool::new(2, 4), limits(1, 8));
        assert_eq!(
            s.add(vec![], seq(1, 1, &log)).unwrap_err().0,
            AddError::Empty
        );
        assert_eq!(
            s.add((0..8).collect(), seq(1, 1, &log)).unwrap_err().0,
            AddError::TooLong(9, 8)
        );
        assert!(s.add((0..7).collect(), seq(1, 1, &log)).is_ok());
    }
}
