//! `duet bench --concurrency 1,2,4,8`: many streams at once through the server's own
//! workers and schedulers (everything but HTTP). For each concurrency N, N requests
//! with different prompts arrive together; reported are the aggregate and per-stream
//! generated tokens per second and the time to first token (p50, p99, mean). A
//! multi-turn case then shows the prefix cache: a long conversation, then one more short
//! turn, whose time to first token is set beside a fresh prompt of the same length.

use super::{random_prompt, Stat};
use crate::bench::BenchModel;
use crate::model::GgufFile;
use crate::serving::worker::{self, Capacity, Event, Job, Lifecycle, ModelSlot};
use crate::serving::Options;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ConcurrencyOptions {
    pub levels: Vec<usize>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Tokens of the multi-turn conversation before its last turn.
    pub conversation_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub streams: usize,
    /// Generated tokens of all streams over the wall time from arrival to the last token.
    pub aggregate_tokens_per_second: f64,
    /// Each stream's generated tokens over its own time from first to last token.
    pub per_stream_tokens_per_second: Stat,
    pub ttft_ms: Stat,
    pub ttft_mean_ms: f64,
    /// Tokens of the prompts taken from the prefix cache (none expected: prompts differ).
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct MultiTurn {
    /// Prompt tokens of the last turn (the whole conversation so far).
    pub prompt_tokens: usize,
    /// Of which the prefix cache held.
    pub cached_tokens: usize,
    pub ttft_cached_ms: f64,
    /// A fresh prompt of the same length, nothing cached.
    pub ttft_uncached_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub device: String,
    pub parallel: usize,
    pub levels: Vec<Level>,
    pub multi_turn: MultiTurn,
}

struct Outcome {
    ttft: Duration,
    tokens: usize,
    /// From first text to done.
    decode: Duration,
    done_at: Instant,
    cached: usize,
    prompt: usize,
}

/// Submits one job and returns a thread that collects its outcome.
fn submit(
    slot: &Arc<ModelSlot>,
    prompt: Vec<u32>,
    gen_tokens: usize,
    fixed_length: bool,
) -> Result<std::thread::JoinHandle<Result<Outcome>>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let start = Instant::now();
    slot.submit(Job {
        model: slot.name.clone(),
        prompt,
        options: Options {
            temperature: 0.0,
            num_predict: gen_tokens as i32,
            ..Options::default()
        },
        constraint: None,
        events: tx,
        enqueued: start,
        load_wait: Duration::ZERO,
        logprobs: None,
        ignore_stop: fixed_length,
        score_from: None,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(std::thread::spawn(move || {
        let mut first = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Text(_) => {
                    first.get_or_insert_with(Instant::now);
                }
                Event::Done(s) => {
                    let now = Instant::now();
                    let first = first.unwrap_or(now);
                    return Ok(Outcome {
                        ttft: first - start,
                        tokens: s.eval_count,
                        decode: now - first,
                        done_at: now,
                        cached: s.cached_tokens,
                        prompt: s.prompt_eval_count,
                    });
                }
                Event::Error(e) => bail!("generation failed: {e}"),
                Event::Started { .. } | Event::Logprobs(_) => {}
            }
        }
        bail!("the worker stopped")
    }))
}

fn wait(h: std::thread::JoinHandle<Result<Outcome>>) -> Result<Outcome> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a bench stream panicked"))?
}

fn level(slot: &Arc<ModelSlot>, n: usize, opts: &ConcurrencyOptions, seed: u64) -> Result<Level> {
    let start = Instant::now();
    let handles = (0..n)
        .map(|i| {
            let prompt = random_prompt(opts.prompt_tokens, seed * 1000 + i as u64);
            submit(slot, prompt, opts.gen_tokens, true)
        })
        .collect::<Result<Vec<_>>>()?;
    let outs = handles.into_iter().map(wait).collect::<Result<Vec<_>>>()?;
    let end = outs.iter().map(|o| o.done_at).max().unwrap_or(start);
    let total: usize = outs.iter().map(|o| o.tokens).sum();
    let ttft: Vec<f64> = outs.iter().map(|o| o.ttft.as_secs_f64() * 1e3).collect();
    Ok(Level {
        streams: n,
        aggregate_tokens_per_second: total as f64 / (end - start).as_secs_f64().max(1e-9),
        per_stream_tokens_per_second: Stat::of(
            outs.iter()
                .map(|o| o.tokens.saturating_sub(1) as f64 / o.decode.as_secs_f64().max(1e-9))
                .collect(),
        ),
        ttft_mean_ms: ttft.iter().sum::<f64>() / n.max(1) as f64,
        ttft_ms: Stat::of(ttft),
        cached_tokens: outs.iter().map(|o| o.cached).sum(),
    })
}

fn multi_turn(slot: &Arc<ModelSlot>, opts: &ConcurrencyOptions) -> Result<MultiTurn> {
    // The conversation so far, answered once (this fills the prefix cache).
    let history = random_prompt(opts.conversation_tokens, 77);
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    slot.submit(Job {
        model: slot.name.clone(),
        prompt: history.clone(),
        options: Options {
            temperature: 0.0,
            num_predict: 16,
            ..Options::default()
        },
        constraint: None,
        events: tx,
        enqueued: Instant::now(),
        load_wait: Duration::ZERO,
        logprobs: None,
        ignore_stop: true,
        score_from: None,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut context = None;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Done(s) => {
                context = Some(s.context);
                break;
            }
            Event::Error(e) => bail!("generation failed: {e}"),
            _ => {}
        }
    }
    let mut next = context.context("the first turn did not finish")?;
    // One more short turn after the answer.
    next.extend(random_prompt(24, 78));
    let cached = wait(submit(slot, next.clone(), 8, true)?)?;
    let fresh = wait(submit(slot, random_prompt(next.len(), 79), 8, true)?)?;
    Ok(MultiTurn {
        prompt_tokens: cached.prompt,
        cached_tokens: cached.cached,
        ttft_cached_ms: cached.ttft.as_secs_f64() * 1e3,
        ttft_uncached_ms: fresh.ttft.as_secs_f64() * 1e3,
    })
}

/// Runs the concurrency levels and the multi-turn case on each model, one at a time.
pub fn run(models: Vec<BenchModel>, opts: &ConcurrencyOptions) -> Result<Vec<ModelReport>> {
    let parallel = opts.levels.iter().copied().max().unwrap_or(1).max(1);
    let mut reports = Vec::new();
    for m in models {
        let path = match &m.weights {
            super::Weights::File(p) => p.clone(),
            super::Weights::Generated(_) => bail!("--concurrency needs real weights"),
        };
        let info = GgufFile::open(&path).and_then(|g| g.info())?;
        let slots = worker::spawn(
            m.device,
            vec![worker::Placement {
                name: m.name.clone(),
                file: Ok(worker::SlotFile::new(path, info)),
                kv_cache_bytes: None,
            }],
            Capacity {
                max_queue: 4 * parallel + 8,
                parallel,
                stall_timeout: crate::serving::worker::DEFAULT_STALL_TIMEOUT,
            },
            Lifecycle::default(),
        );
        let slot = slots.into_iter().next().context("no slot")?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(slot.ready_model())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut levels = Vec::new();
        for (i, &n) in opts.levels.iter().enumerate() {
            levels.push(level(&slot, n, opts, i as u64 + 1)?);
        }
        reports.push(ModelReport {
            model: m.name,
            device: m.device.to_string(),
            parallel,
            levels,
            multi_turn: multi_turn(&slot, opts)?,
        });
    }
    Ok(reports)
}

/// The reports as Markdown tables.
pub fn markdown(reports: &[ModelReport], opts: &ConcurrencyOptions) -> String {
    let mut s = format!(
        "Prompts of {} tokens, {} generated tokens per stream (greedy, end-of-turn ignored), \
         `--parallel` = the largest concurrency.\n\n",
        opts.prompt_tokens, opts.gen_tokens
    );
    s += "| model | streams | aggregate tok/s | per-stream tok/s | TTFT p50 ms | TTFT p99 ms | TTFT mean ms |\n";
    s += "|---|---|---|---|---|---|---|\n";
    for r in reports {
        for l in &r.levels {
            let p99 = percentile(&l.ttft_ms.samples, 0.99);
            s += &format!(
                "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |\n",
                r.model,
                l.streams,
                l.aggregate_tokens_per_second,
                l.per_stream_tokens_per_second.median,
                l.ttft_ms.median,
                p99,
                l.ttft_mean_ms
            );
        }
    }
    s += "\n| model | last turn's prompt tokens | from the prefix cache | TTFT with the cache ms | TTFT of a fresh prompt as long ms | ratio |\n";
    s += "|---|---|---|---|---|---|\n";
    for r in reports {
        let t = &r.multi_turn;
        s += &format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.1}% |\n",
            r.model,
            t.prompt_tokens,
            t.cached_tokens,
            t.ttft_cached_ms,
            t.ttft_uncached_ms,
            100.0 * t.ttft_cached_ms / t.ttft_uncached_ms.max(1e-9)
        );
    }
    s
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
