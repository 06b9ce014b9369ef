//! `duet bench`: per-device token throughput. Each model of the layout is loaded on its
//! device by a thread of its own (the only thread driving that device), then measured
//! alone (prompt processing at several prompt sizes, generation of a fixed number of
//! tokens, time to first token) and finally with every device generating at the same
//! moment, to show what true concurrency gives.

pub mod concurrency;

use crate::config::DeviceSpec;
use crate::kernels::CpuId;
use crate::model::synthetic::Shape;
use crate::model::{create_device, Model};
use crate::serving::Options;
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_sizes: Vec<usize>,
    pub gen_tokens: usize,
    pub reps: usize,
}

impl BenchOptions {
    pub fn full() -> Self {
        Self {
            prompt_sizes: vec![128, 512],
            gen_tokens: 128,
            reps: 3,
        }
    }
    /// A short run for CI.
    pub fn quick() -> Self {
        Self {
            prompt_sizes: vec![32],
            gen_tokens: 8,
            reps: 1,
        }
    }
}

/// Median and spread of repeated measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => samples[n / 2],
            _ => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
        };
        Self {
            median,
            min: samples.first().copied().unwrap_or(0.0),
            max: samples.last().copied().unwrap_or(0.0),
            samples,
        }
    }

    fn cell(&self) -> String {
        format!("{:.1} ({:.1}–{:.1})", self.median, self.min, self.max)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    pub tokens: usize,
    pub tokens_per_second: Stat,
}

/// Where a benchmarked model's weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    File(PathBuf),
    /// Generated weights of a real model's shape (`--dummy-weights`).
    Generated(Shape),
}

/// One model to measure, on its device.
#[derive(Debug, Clone)]
pub struct BenchModel {
    pub name: String,
    pub weights: Weights,
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceResult {
    pub model: String,
    pub device: String,
    /// Whether the weights were generated (random values of the real shapes).
    pub generated_weights: bool,
    pub load_seconds: f64,
    /// Bytes of weights one generated token reads.
    pub weight_bytes_per_token: u64,
    pub prompt: Vec<PromptResult>,
    pub generation_tokens: usize,
    pub generation_tokens_per_second: Stat,
    pub time_to_first_token_ms: Stat,
    /// Generation rate while every device generates at once.
    pub concurrent_tokens_per_second: Option<Stat>,
}

impl DeviceResult {
    /// Weight bytes read per second at the median generation rate: set beside the
    /// device's memory bandwidth, how close decoding runs to its roofline.
    pub fn decode_bandwidth(&self) -> f64 {
        self.weight_bytes_per_token as f64 * self.generation_tokens_per_second.median
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    /// The processor (CPUID), and which of duet's CPU kernels ran on it.
    pub cpu: CpuId,
    pub cpu_kernels: String,
    pub layout: String,
    pub threads: usize,
    pub options: ReportOptions,
    pub results: Vec<DeviceResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportOptions {
    pub prompt_sizes: Vec<usize>,
    pub gen_tokens: usize,
    pub reps: usize,
}

enum Task {
    Prompt(usize),
    Generate(usize),
}

struct Measured {
    tokens_per_second: f64,
    ttft: Duration,
}

pub(crate) fn random_prompt(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Ordinary (non-special) vocabulary ids.
    (0..n).map(|_| rng.random_range(100..150_000)).collect()
}

fn measure(model: &Model, task: &Task, seed: u64) -> Result<Measured> {
    let greedy = Options {
        temperature: 0.0,
        num_ctx: 4096,
        ..Options::default()
    };
    match *task {
        Task::Prompt(n) => {
            let opts = Options {
                num_predict: 0,
                ..greedy
            };
            let mut g = model.generate(random_prompt(n, seed), &opts)?;
            g.collect_text()?;
            let s = g.summary();
            Ok(Measured {
                tokens_per_second: s.prompt_eval_count as f64
                    / s.prompt_eval_duration.as_secs_f64().max(1e-9),
                ttft: s.prompt_eval_duration,
            })
        }
        Task::Generate(n) => {
            let opts = Options {
                num_predict: n as i32,
                ..greedy
            };
            let start = Instant::now();
            let mut g = model
                .generate(random_prompt(16, seed), &opts)?
                .ignore_stop_tokens();
            let mut ttft = None;
            for piece in g.by_ref() {
                piece?;
                ttft.get_or_insert_with(|| start.elapsed());
            }
            let s = g.summary();
            if s.eval_count != n {
                anyhow::bail!("generation stopped after {} of {n} tokens", s.eval_count);
            }
            Ok(Measured {
                tokens_per_second: s.eval_count as f64 / s.eval_duration.as_secs_f64().max(1e-9),
                ttft: ttft.unwrap_or_default(),
            })
        }
    }
}

struct Worker {
    name: String,
    device: DeviceSpec,
    generated: bool,
    load: Duration,
    weight_bytes: u64,
    /// `None` once the worker is being stopped.
    tasks: Option<mpsc::Sender<(Task, u64)>>,
    results: mpsc::Receiver<Result<Measured>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the thread that creates the device, loads the model there and runs its
/// measurements: the only thread that drives that model.
fn start_worker(m: BenchModel) -> Result<Worker> {
    let (task_tx, task_rx) = mpsc::channel::<(Task, u64)>();
    let (res_tx, res_rx) = mpsc::channel::<Result<Measured>>();
    let (load_tx, load_rx) = mpsc::channel::<Result<(Duration, u64)>>();
    let BenchModel {
        name,
        weights,
        device,
    } = m;
    let generated = matches!(weights, Weights::Generated(_));
    let thread_name = name.clone();
    let thread = std::thread::Builder::new()
        .name(format!("bench-{device}"))
        .spawn(move || {
            let loaded = create_device(device).and_then(|dev| match &weights {
                Weights::File(path) => Model::load_on(&thread_name, path, device, &dev),
                Weights::Generated(shape) => Model::synthetic(*shape, device, &dev),
            });
            let model = match loaded {
                Ok(m) => {
                    let _ = load_tx.send(Ok((m.load_duration, m.weights.weight_bytes_per_token())));
                    m
                }
                Err(e) => {
                    let _ = load_tx.send(Err(e.into()));
                    return;
                }
            };
            while let Ok((task, seed)) = task_rx.recv() {
                if res_tx.send(measure(&model, &task, seed)).is_err() {
                    break;
                }
            }
        })?;
    let (load, weight_bytes) = load_rx
        .recv()
        .context("bench worker died while loading")?
        .with_context(|| format!("loading {name} on {device}"))?;
    Ok(Worker {
        name,
        device,
        generated,
        load,
        weight_bytes,
        tasks: Some(task_tx),
        results: res_rx,
        thread: Some(thread),
    })
}

impl Worker {
    fn send(&self, task: Task, seed: u64) -> Result<()> {
        self.tasks
            .as_ref()
            .context("bench worker stopped")?
            .send((task, seed))
            .context("bench worker stopped")
    }

    fn run(&self, task: Task, seed: u64) -> Result<Measured> {
        self.send(task, seed)?;
        self.results.recv().context("bench worker stopped")?
    }
}

/// Stops the worker and waits until it has dropped its model. A model freed on its own
/// thread while the process exits races the CUDA driver's teardown: on an H100 that
/// ended `duet bench` with a segmentation fault after the report was written.
impl Drop for Worker {
    fn drop(&mut self) {
        self.tasks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs the benchmark over `models`.
pub fn run(
    layout: &str,
    models: Vec<BenchModel>,
    opts: &BenchOptions,
    threads: usize,
) -> Result<Report> {
    let steps = models.len() * (opts.prompt_sizes.len() + 1) * opts.reps + opts.reps;
    let bar = indicatif::ProgressBar::new(steps as u64 + models.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut workers = Vec::new();
    for m in models {
        bar.set_message(format!("loading {} on {}", m.name, m.device));
        workers.push(start_worker(m)?);
        bar.inc(1);
    }
    // Warm each model up once, one at a time, so lazy set-up is not measured.
    for w in &workers {
        w.run(Task::Generate(2), 0)?;
    }
    let mut results = Vec::new();
    for w in &workers {
        let mut prompt = Vec::new();
        for &n in &opts.prompt_sizes {
            bar.set_message(format!("{} on {}: prompt {n}", w.name, w.device));
            let mut rates = Vec::new();
            for rep in 0..opts.reps {
                rates.push(w.run(Task::Prompt(n), rep as u64)?.tokens_per_second);
                bar.inc(1);
            }
            prompt.push(PromptResult {
                tokens: n,
                tokens_per_second: Stat::of(rates),
            });
        }
        bar.set_message(format!(
            "{} on {}: generate {}",
            w.name, w.device, opts.gen_tokens
        ));
        let (mut rates, mut ttfts) = (Vec::new(), Vec::new());
        for rep in 0..opts.reps {
            let m = w.run(Task::Generate(opts.gen_tokens), 100 + rep as u64)?;
            rates.push(m.tokens_per_second);
            ttfts.push(m.ttft.as_secs_f64() * 1000.0);
            bar.inc(1);
        }
        results.push(DeviceResult {
            model: w.name.clone(),
            device: w.device.to_string(),
            generated_weights: w.generated,
            load_seconds: w.load.as_secs_f64(),
            weight_bytes_per_token: w.weight_bytes,
            prompt,
            generation_tokens: opts.gen_tokens,
            generation_tokens_per_second: Stat::of(rates),
            time_to_first_token_ms: Stat::of(ttfts),
            concurrent_tokens_per_second: None,
        });
    }
    // Every device generating at the same moment.
    bar.set_message("all devices at once".to_string());
    let mut together: Vec<Vec<f64>> = vec![Vec::new(); workers.len()];
    for rep in 0..opts.reps {
        for w in &workers {
            w.send(Task::Generate(opts.gen_tokens), 200 + rep as u64)?;
        }
        for (i, w) in workers.iter().enumerate() {
            let m = w.results.recv().context("bench worker stopped")??;
            together[i].push(m.tokens_per_second);
        }
        bar.inc(1);
    }
    for (r, rates) in results.iter_mut().zip(together) {
        r.concurrent_tokens_per_second = Some(Stat::of(rates));
    }
    bar.finish_and_clear();
    Ok(Report {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cpu: CpuId::read(),
        cpu_kernels: crate::kernels::kernels(),
        layout: layout.to_string(),
        threads,
        options: ReportOptions {
            prompt_sizes: opts.prompt_sizes.clone(),
            gen_tokens: opts.gen_tokens,
            reps: opts.reps,
        },
        results,
    })
}

/// The CPU, duet's kernels on it and the time, for a report's header.
pub fn cpu_line() -> String {
    format!(
        "CPU: {}; duet's CPU kernels: {}; {}",
        CpuId::read(),
        crate::kernels::kernels(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// The report as Markdown tables: each device alone, then all together.
pub fn markdown(r: &Report) -> String {
    let mut out = format!(
        "duet bench: layout {}, {} CPU threads, {} repetitions (median (min–max)), {}\n\
         CPU: {}; duet's CPU kernels: {}\n\n",
        r.layout, r.threads, r.options.reps, r.date, r.cpu, r.cpu_kernels
    );
    out.push_str("| model | device | load s |");
    for p in &r.options.prompt_sizes {
        out.push_str(&format!(" prompt {p} tok/s |"));
    }
    out.push_str(&format!(
        " generate {} tok/s | time to first token ms | weights read per token | weight bytes/s while generating |\n",
        r.options.gen_tokens
    ));
    out.push_str(&"|---".repeat(7 + r.options.prompt_sizes.len()));
    out.push_str("|\n");
    for d in &r.results {
        out.push_str(&format!(
            "| {} | {} | {:.2} |",
            d.model, d.device, d.load_seconds
        ));
        for p in &d.prompt {
            out.push_str(&format!(" {} |", p.tokens_per_second.cell()));
        }
        out.push_str(&format!(
            " {} | {} | {:.3} GB | {:.1} GB/s |\n",
            d.generation_tokens_per_second.cell(),
            d.time_to_first_token_ms.cell(),
            d.weight_bytes_per_token as f64 / 1e9,
            d.decode_bandwidth() / 1e9,
        ));
    }
    out.push_str("\nAll devices generating at the same moment:\n\n");
    out.push_str("| model | device | alone tok/s | together tok/s | together / alone |\n|---|---|---|---|---|\n");
    let mut sum_alone = 0.0;
    let mut sum_together = 0.0;
    for d in &r.results {
        let alone = d.generation_tokens_per_second.median;
        let together = d
            .concurrent_tokens_per_second
            .as_ref()
            .map(|s| s.median)
            .unwrap_or(0.0);
        sum_alone += alone;
        sum_together += together;
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} |\n",
            d.model,
            d.device,
            alone,
            together,
            together / alone.max(1e-9)
        ));
    }
    out.push_str(&format!(
        "| all | | {sum_alone:.1} (sum, one at a time) | {sum_together:.1} (sum, together) | |\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_median_and_range() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stat::of(vec![4.0, 1.0]);
        assert_eq!(s.median, 2.5);
    }
}
