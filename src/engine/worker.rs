//! One OS thread per device. The thread creates the device's candle `Device` once, loads
//! and warms the models placed on it, then runs their jobs one at a time; it is the only
//! thread that drives that device. A bounded count of pending jobs per model stands in
//! front, so a full queue is refused at once instead of growing without bound.

use super::{EngineError, Model, ModelInfo, Options, Summary};
use crate::config::DeviceSpec;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

/// What a job sends back while it runs.
#[derive(Debug)]
pub enum Event {
    /// The worker picked the job up after waiting this long in the queue.
    Started {
        queue_wait: Duration,
    },
    /// Text produced by one or more tokens.
    Text(String),
    Done(Summary),
    Error(String),
}

pub struct Job {
    pub model: String,
    pub prompt: Vec<u32>,
    pub options: Options,
    /// Keeps the output to a grammar (structured output).
    pub constraint: Option<super::grammar::Constraint>,
    /// Dropped receiver = the client went away: the worker stops at the next token.
    pub events: tokio::sync::mpsc::Sender<Event>,
    pub enqueued: Instant,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("server busy, please try again.  maximum pending requests exceeded")]
    QueueFull,
    #[error("model '{0}' is still loading")]
    Loading(String),
    #[error("model '{model}' is unavailable: {why}")]
    Unavailable { model: String, why: String },
}

/// The state of one model as the server sees it.
pub struct ModelSlot {
    pub name: String,
    pub device: DeviceSpec,
    pub path: PathBuf,
    /// The file's metadata, read before loading.
    pub info: ModelInfo,
    /// Set once the worker has loaded and warmed it.
    model: OnceLock<Arc<Model>>,
    /// Set when loading failed (the model stays unavailable).
    failed: OnceLock<String>,
    pending: AtomicUsize,
    in_flight: AtomicUsize,
    max_queue: usize,
    jobs: mpsc::Sender<Job>,
}

impl ModelSlot {
    pub fn model(&self) -> Option<&Arc<Model>> {
        self.model.get()
    }

    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    pub fn is_ready(&self) -> bool {
        self.model.get().is_some()
    }

    /// Jobs waiting (not yet started) for this model.
    pub fn queue_depth(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether a job submitted now would be refused for a full queue.
    pub fn is_full(&self) -> bool {
        self.queue_depth() >= self.max_queue
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if let Some(why) = self.failure() {
            return Err(SubmitError::Unavailable {
                model: self.name.clone(),
                why: why.to_string(),
            });
        }
        if !self.is_ready() {
            return Err(SubmitError::Loading(self.name.clone()));
        }
        let prev = self.pending.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_queue {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull);
        }
        self.jobs.send(job).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            SubmitError::Unavailable {
                model: self.name.clone(),
                why: "its worker has stopped".into(),
            }
        })
    }
}

/// A model to place on a worker.
pub struct Placement {
    pub name: String,
    pub path: PathBuf,
    pub info: ModelInfo,
}

/// Starts the worker thread of one device. The returned slots fill in as models load.
pub fn spawn(
    device: DeviceSpec,
    placements: Vec<Placement>,
    max_queue: usize,
) -> Vec<Arc<ModelSlot>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let slots: Vec<Arc<ModelSlot>> = placements
        .into_iter()
        .map(|p| {
            Arc::new(ModelSlot {
                name: p.name,
                device,
                path: p.path,
                info: p.info,
                model: OnceLock::new(),
                failed: OnceLock::new(),
                pending: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_queue,
                jobs: tx.clone(),
            })
        })
        .collect();
    drop(tx);
    let worker_slots = slots.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("duet-{device}"))
        .spawn(move || worker_main(device, worker_slots, rx));
    if let Err(e) = spawned {
        for s in &slots {
            let _ = s.failed.set(format!("cannot start the worker thread: {e}"));
        }
    }
    slots
}

fn worker_main(device: DeviceSpec, slots: Vec<Arc<ModelSlot>>, rx: mpsc::Receiver<Job>) {
    // The device is created once, here, and only this thread drives it.
    let dev = match super::create_device(device) {
        Ok(dev) => dev,
        Err(e) => {
            for slot in &slots {
                tracing::error!(model = %slot.name, %device, error = %e, "device unavailable: model not loaded");
                let _ = slot.failed.set(e.to_string());
            }
            return;
        }
    };
    for slot in &slots {
        match load_and_warm(slot, device, &dev) {
            Ok(model) => {
                let _ = slot.model.set(Arc::new(model));
            }
            Err(e) => {
                tracing::error!(model = %slot.name, %device, error = %e, "model failed to load");
                let _ = slot.failed.set(e.to_string());
            }
        }
    }
    while let Ok(job) = rx.recv() {
        let Some(slot) = slots.iter().find(|s| s.name == job.model) else {
            let _ = job.events.blocking_send(Event::Error(format!(
                "model '{}' is not on {device}",
                job.model
            )));
            continue;
        };
        slot.pending.fetch_sub(1, Ordering::AcqRel);
        if job.events.is_closed() {
            continue; // the client gave up while queued
        }
        let Some(model) = slot.model.get() else {
            continue;
        };
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        run_job(model, job);
        slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn load_and_warm(
    slot: &ModelSlot,
    device: DeviceSpec,
    dev: &candle_core::Device,
) -> Result<Model, EngineError> {
    let start = Instant::now();
    tracing::info!(model = %slot.name, %device, path = %slot.path.display(), "loading");
    let model = Model::load_on(&slot.name, &slot.path, device, dev)?;
    // One short forward pass so the first request does not pay for lazy set-up
    // (weight repacking, allocator growth, kernel compilation on GPUs).
    let warm = Options {
        temperature: 0.0,
        num_predict: 1,
        ..Options::default()
    };
    let prompt = model.tokenize("Hello")?;
    model.generate(prompt, &warm)?.collect_text()?;
    tracing::info!(model = %slot.name, %device, secs = start.elapsed().as_secs_f64(), "loaded and warm");
    Ok(model)
}

fn run_job(model: &Model, job: Job) {
    let send = |e: Event| job.events.blocking_send(e).is_ok();
    if !send(Event::Started {
        queue_wait: job.enqueued.elapsed(),
    }) {
        return;
    }
    let mut generation = match model.generate(job.prompt, &job.options) {
        Ok(g) => match job.constraint {
            Some(c) => g.with_constraint(c),
            None => g,
        },
        Err(e) => {
            send(Event::Error(e.to_string()));
            return;
        }
    };
    for piece in generation.by_ref() {
        match piece {
            Ok(p) if p.text.is_empty() => {}
            Ok(p) => {
                if !send(Event::Text(p.text)) {
                    tracing::info!(model = %model.name, "client went away: generation stopped");
                    return;
                }
            }
            Err(e) => {
                send(Event::Error(e.to_string()));
                return;
            }
        }
        if job.events.is_closed() {
            tracing::info!(model = %model.name, "client went away: generation stopped");
            return;
        }
    }
    send(Event::Done(generation.summary()));
}
