//! One OS thread per device. The thread creates the device's candle `Device` once, loads
//! and warms the models placed on it (at start, or on a model's first request), runs
//! their jobs through one [`Scheduler`] per model (continuous batching: up to
//! `--parallel` sequences share each forward pass) and unloads a model whose keep-alive
//! has run out; it is the only thread that drives that device. A bounded count of jobs
//! waiting to start per model stands in front, so a full queue is refused at once
//! instead of growing without bound.
//!
//! Faults stay as small as they can: a panic in one request's decoding fails that
//! request; one in a forward pass fails that pass's requests; one anywhere else in the
//! loop restarts the loop (the requests it was running fail, the queued ones run), and
//! a thread that stops anyway marks its models failed. A model whose mapped file is cut
//! short ([`super::mapping`]) or changes on disk fails with the reason, and the router
//! falls back. A client that stops reading its stream is dropped after the stall
//! timeout, so it never holds a batch slot.

use super::blocks::BlockPool;
use super::mapping::MappedFile;
use super::scheduler::{Advance, Limits, Scheduler, Sequence, Then};
use super::sequence::Decoding;
use super::{Logprob, Options, Summary};
use crate::config::DeviceSpec;
use crate::keep_alive::KeepAlive;
use crate::model::{EngineError, Model, ModelInfo};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a job sends back while it runs.
#[derive(Debug)]
pub enum Event {
    /// The worker picked the job up after waiting this long in the queue.
    Started {
        queue_wait: Duration,
    },
    /// Text produced by one or more tokens.
    Text(String),
    /// Log probabilities of the tokens behind the next `Text` (when the job asked).
    Logprobs(Vec<super::Logprob>),
    Done(Summary),
    Error(String),
}

pub struct Job {
    pub model: String,
    pub prompt: Vec<u32>,
    pub options: Options,
    /// Keeps the output to a grammar (structured output).
    pub constraint: Option<crate::model::grammar::Constraint>,
    /// Dropped receiver = the client went away: the worker stops at the next token.
    pub events: tokio::sync::mpsc::Sender<Event>,
    pub enqueued: Instant,
    /// How long the request waited for its model to load before it was submitted.
    pub load_wait: Duration,
    /// Report log probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-turn tokens (fixed-length benchmarks).
    pub ignore_stop: bool,
    /// Score the prompt instead of generating: the log-probability of each of its tokens
    /// from this position on comes back as one `Logprobs` event before `Done`.
    pub score_from: Option<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("server busy, please try again.  maximum pending requests exceeded")]
    QueueFull,
    #[error("model '{model}' is unavailable: {why}")]
    Unavailable { model: String, why: String },
}

/// Where a model is in its life.
#[derive(Clone)]
pub enum Load {
    /// Its weights are not on disk (never fetched, or deleted): `duet pull` fetches them.
    Absent(String),
    /// Not in memory; the next request loads it.
    Unloaded,
    Loading,
    Ready(Arc<Model>),
    /// Loading failed; the model stays unavailable.
    Failed(String),
}

/// How long a model loaded for a request with keep-alive 0 waits for that request's job.
const LOAD_GRACE: Duration = Duration::from_secs(5);

/// What the API asks of a device's worker besides jobs.
enum Msg {
    Job(Box<Job>, Ticket),
    Load(String),
    Unload(String),
    /// The weights were deleted: forget the keep-alive.
    Remove(String),
    /// The weights file changed under the loaded model (rewritten in place): its
    /// running requests fail with this reason.
    Invalidate(String, String),
}

/// A model's weights file and what its header says.
pub struct SlotFile {
    pub path: PathBuf,
    /// The file's metadata, read before loading.
    pub info: ModelInfo,
    /// Which file this was on disk when it was read (to notice it change).
    pub stamp: Option<FileStamp>,
}

impl SlotFile {
    /// A file read now: its stamp is taken from the disk.
    pub fn new(path: PathBuf, info: ModelInfo) -> Self {
        let stamp = FileStamp::of(&path);
        Self { path, info, stamp }
    }
}

/// What identifies a file's contents cheaply: its inode, size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file `path` leads to now (`None` when it is gone).
    pub fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }

    /// The same file (inode), whatever happened to its contents.
    pub fn same_inode(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// The state of one model as the server sees it.
pub struct ModelSlot {
    pub name: String,
    pub device: DeviceSpec,
    /// `None` while the weights are absent.
    file: std::sync::RwLock<Option<Arc<SlotFile>>>,
    load: watch::Sender<Load>,
    /// The keep-alive the last request asked for (or the server's default).
    keep_alive: Mutex<KeepAlive>,
    /// When the model unloads if nothing else arrives (`None`: never, or busy).
    expires: Mutex<Option<Instant>>,
    /// Jobs submitted and not yet running; each counts through a [`Ticket`].
    pending: Arc<AtomicUsize>,
    in_flight: AtomicUsize,
    max_queue: usize,
    parallel: usize,
    stall_timeout: Duration,
    kv_cache_bytes: Option<u64>,
    /// What the model's scheduler has done.
    pub stats: StepStats,
    jobs: mpsc::Sender<Msg>,
}

/// Counts of a model's scheduler steps, for /metrics.
#[derive(Default)]
pub struct StepStats {
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Steps in which two or more sequences decoded a token together.
    pub batched_decode_steps: AtomicU64,
    /// Tokens decoded (one per sequence per step) and prompt positions computed.
    pub decoded_tokens: AtomicU64,
    pub prefill_tokens: AtomicU64,
    /// Prompt positions taken from the prefix cache instead of computed.
    pub prefix_hit_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Sequences running after the last step.
    pub running: AtomicU64,
    /// Panics caught in one request's decoding or start (that request failed).
    pub request_panics: AtomicU64,
    /// Panics caught in a forward pass (its batch's requests failed).
    pub batch_panics: AtomicU64,
    /// Panics in the worker thread's loop (it restarted), counted on each of its models.
    pub worker_panics: AtomicU64,
}

impl StepStats {
    fn record(&self, r: &super::scheduler::StepReport) {
        let add = |c: &AtomicU64, n: usize| c.fetch_add(n as u64, Ordering::Relaxed);
        if r.sequences > 0 {
            add(&self.steps, 1);
        }
        if r.decodes >= 2 {
            add(&self.batched_decode_steps, 1);
        }
        add(&self.decoded_tokens, r.decodes);
        add(&self.prefill_tokens, r.tokens - r.decodes);
        add(&self.prefix_hit_tokens, r.prefix_hit_tokens);
        add(&self.preemptions, r.preempted);
    }
}

impl ModelSlot {
    /// The weights file, when it is on disk.
    pub fn file(&self) -> Option<Arc<SlotFile>> {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the weights are absent (a request gets 404, as for a model not pulled).
    pub fn is_absent(&self) -> bool {
        matches!(*self.load.borrow(), Load::Absent(_))
    }

    /// The weights arrived (`duet pull`): the model loads at its next request.
    pub fn set_file(&self, file: SlotFile) {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file));
        self.load.send_if_modified(|s| {
            if matches!(s, Load::Absent(_) | Load::Failed(_)) {
                *s = Load::Unloaded;
                true
            } else {
                false
            }
        });
    }

    /// The weights file changed on disk while the server ran. `Ok`: it is a usable
    /// model again (replaced, or rewritten and checked): the model reloads at its next
    /// request. `Err`: it cannot be used (cut short, corrupt): the model is unavailable
    /// with that reason, and the router falls back. Either way, requests running on a
    /// file rewritten in place fail (their weights changed under them); on a replaced
    /// file (a new inode) they finish on the old one.
    pub fn file_changed(&self, now: Result<SlotFile, String>, in_place: bool) {
        let why = match now {
            Ok(file) => {
                tracing::warn!(model = %self.name, path = %file.path.display(), "weights file changed on disk: the model reloads at its next request");
                *self.file.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file));
                self.load.send_if_modified(|s| {
                    if matches!(s, Load::Ready(_) | Load::Failed(_)) {
                        *s = Load::Unloaded;
                        true
                    } else {
                        false
                    }
                });
                "its weights file was rewritten while the request ran".to_string()
            }
            Err(why) => {
                tracing::error!(model = %self.name, reason = %why, "weights file changed on disk: model unavailable");
                self.load.send_if_modified(|s| {
                    if matches!(s, Load::Absent(_)) {
                        return false;
                    }
                    *s = Load::Failed(why.clone());
                    true
                });
                why
            }
        };
        if in_place {
            let _ = self.jobs.send(Msg::Invalidate(self.name.clone(), why));
        }
    }

    /// The weights are gone (`duet rm`): unloaded, and absent until pulled again.
    pub fn remove_file(&self, why: &str) {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = None;
        // Absent at once, so the next request is a 404; a generation already running
        // keeps its own reference to the model and finishes.
        self.load.send_replace(Load::Absent(why.to_string()));
        let _ = self.jobs.send(Msg::Remove(self.name.clone()));
    }

    pub fn state(&self) -> Load {
        self.load.borrow().clone()
    }

    pub fn model(&self) -> Option<Arc<Model>> {
        match &*self.load.borrow() {
            Load::Ready(m) => Some(m.clone()),
            _ => None,
        }
    }

    pub fn failure(&self) -> Option<String> {
        match &*self.load.borrow() {
            Load::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(*self.load.borrow(), Load::Ready(_))
    }

    pub fn is_loading(&self) -> bool {
        matches!(*self.load.borrow(), Load::Loading)
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

    fn unavailable(&self, why: impl Into<String>) -> SubmitError {
        SubmitError::Unavailable {
            model: self.name.clone(),
            why: why.into(),
        }
    }

    /// Sets how long the model stays loaded after the current requests.
    pub fn set_keep_alive(&self, k: KeepAlive) {
        *self.keep_alive.lock().unwrap_or_else(|e| e.into_inner()) = k;
    }

    pub fn keep_alive(&self) -> KeepAlive {
        *self.keep_alive.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the model unloads as things stand: `None` for never. A busy model expires its
    /// keep-alive after the work in hand, as Ollama reports it.
    pub fn expires_at(&self) -> Option<Instant> {
        if self.queue_depth() + self.in_flight() > 0 {
            return self.keep_alive().deadline(Instant::now());
        }
        *self.expires.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_expiry(&self, at: Option<Instant>) {
        *self.expires.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// The loaded model, loading it first (on its worker) if it is not in memory and
    /// waiting while it loads. Fails only when loading fails.
    pub async fn ready_model(&self) -> Result<Arc<Model>, SubmitError> {
        let mut rx = self.load.subscribe();
        loop {
            let begin_load = self.load.send_if_modified(|s| {
                if matches!(s, Load::Unloaded) {
                    *s = Load::Loading;
                    true
                } else {
                    false
                }
            });
            if begin_load && self.jobs.send(Msg::Load(self.name.clone())).is_err() {
                self.load
                    .send_replace(Load::Failed("its worker has stopped".into()));
            }
            let settled = rx
                .wait_for(|s| !matches!(s, Load::Loading))
                .await
                .map_err(|_| self.unavailable("its worker has stopped"))?
                .clone();
            match settled {
                Load::Ready(m) => return Ok(m),
                Load::Failed(why) | Load::Absent(why) => return Err(self.unavailable(why)),
                // Unloaded again before this request got it (keep_alive 0 elsewhere).
                Load::Unloaded | Load::Loading => continue,
            }
        }
    }

    /// Restarts the keep-alive of a loaded model from now (a request that only loads).
    pub fn refresh(&self) {
        // Set here as well as by the worker, so that /api/ps right after the answer shows
        // the new deadline even while the worker is busy with its step.
        // (A keep-alive of zero is the worker's to apply, with its grace after a load.)
        let k = self.keep_alive();
        if self.is_ready() && !k.is_zero() {
            self.set_expiry(k.deadline(Instant::now()));
        }
        let _ = self.jobs.send(Msg::Load(self.name.clone()));
    }

    /// Asks the worker to unload the model once the work in hand is done.
    pub fn unload(&self) {
        self.set_keep_alive(KeepAlive::NOW);
        let _ = self.jobs.send(Msg::Unload(self.name.clone()));
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if let Some(why) = self.failure() {
            return Err(self.unavailable(why));
        }
        let (ticket, ahead) = Ticket::take(&self.pending);
        if ahead >= self.max_queue {
            return Err(SubmitError::QueueFull);
        }
        self.jobs
            .send(Msg::Job(Box::new(job), ticket))
            .map_err(|_| self.unavailable("its worker has stopped"))
    }
}

/// A job counted as waiting in its model's queue: the count drops when the ticket
/// does, however the job leaves (started, refused, or lost with a panicking worker), so
/// the queue gauge always returns to 0.
struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    /// A place in the count, and how many were counted before it.
    fn take(count: &Arc<AtomicUsize>) -> (Self, usize) {
        let ahead = count.fetch_add(1, Ordering::AcqRel);
        (Self(count.clone()), ahead)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A model to place on a worker: its file, or why it is absent.
pub struct Placement {
    pub name: String,
    pub file: Result<SlotFile, String>,
    /// Memory for its KV cache blocks, in bytes (default: num_ctx × parallel positions).
    pub kv_cache_bytes: Option<u64>,
}

/// How many requests a worker runs at once and lets wait, per model.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Requests that may wait to start before new ones are refused.
    pub max_queue: usize,
    /// Sequences that run at once (`--parallel`, OLLAMA_NUM_PARALLEL).
    pub parallel: usize,
    /// How long a client may leave its stream unread before it counts as gone.
    pub stall_timeout: Duration,
}

/// A client that takes nothing of its stream for this long is dropped (`--client-timeout`).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sequences per model that run at once unless `--parallel` says otherwise.
pub const DEFAULT_PARALLEL: usize = 4;

/// Tokens per scheduler step at most (decodes and prompt chunks together): enough for
/// the matrices to run at full speed on a GPU.
pub const STEP_TOKENS: usize = 256;

/// The time a step that reads prompts aims at: the scheduler sizes its budget from the
/// measured steps so that a request arriving during a long prompt waits about this long
/// for its turn (a 256-token step of the 0.5B took 1.1 s on 2 cores), then shares the
/// next steps with it.
pub const STEP_TIME: Duration = Duration::from_millis(400);

/// How a worker treats its models' lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// Load every model when the worker starts (else on its first request).
    pub preload: bool,
    /// Keep-alive of a request that does not set one.
    pub keep_alive: KeepAlive,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            preload: true,
            keep_alive: KeepAlive::FOREVER,
        }
    }
}

/// Starts the worker thread of one device. The returned slots fill in as models load.
pub fn spawn(
    device: DeviceSpec,
    placements: Vec<Placement>,
    capacity: Capacity,
    life: Lifecycle,
) -> Vec<Arc<ModelSlot>> {
    let (tx, rx) = mpsc::channel::<Msg>();
    let initial = if life.preload {
        Load::Loading
    } else {
        Load::Unloaded
    };
    let slots: Vec<Arc<ModelSlot>> = placements
        .into_iter()
        .map(|p| {
            let (file, load) = match p.file {
                Ok(f) => (Some(Arc::new(f)), initial.clone()),
                Err(why) => (None, Load::Absent(why)),
            };
            Arc::new(ModelSlot {
                name: p.name,
                device,
                file: std::sync::RwLock::new(file),
                load: watch::Sender::new(load),
                keep_alive: Mutex::new(life.keep_alive),
                expires: Mutex::new(None),
                pending: Arc::new(AtomicUsize::new(0)),
                in_flight: AtomicUsize::new(0),
                max_queue: capacity.max_queue,
                parallel: capacity.parallel.max(1),
                stall_timeout: capacity.stall_timeout,
                kv_cache_bytes: p.kv_cache_bytes,
                stats: StepStats::default(),
                jobs: tx.clone(),
            })
        })
        .collect();
    drop(tx);
    let worker_slots = slots.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("duet-{device}"))
        .spawn(move || {
            let _stopped = Stopped(worker_slots.clone());
            let mut w = Worker::start(device, worker_slots, life);
            let mut panics: Vec<Instant> = Vec::new();
            loop {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(&rx)));
                let Err(payload) = run else { break };
                let why = panic_message(payload.as_ref());
                panics.retain(|t| t.elapsed() < RESTART_WINDOW);
                panics.push(Instant::now());
                w.restart(&why, panics.len() > MAX_RESTARTS);
            }
        });
    if let Err(e) = spawned {
        for s in &slots {
            s.load
                .send_replace(Load::Failed(format!("cannot start the worker thread: {e}")));
        }
    }
    slots
}

/// Restarts of a worker's loop within [`RESTART_WINDOW`] before its models are failed.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// What a caught panic said.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `f`, turning a panic into `Err` with its message.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// Dropped when a worker thread ends, however it ends: its models are failed, so no
/// request waits on a queue nobody reads.
struct Stopped(Vec<Arc<ModelSlot>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        for slot in &self.0 {
            slot.load
                .send_replace(Load::Failed("its worker thread has stopped".into()));
        }
    }
}

/// Faults the tests inject (`DUET_INJECT_FAULT=KIND:TEXT`, comma-separated): a request
/// whose prompt contains TEXT panics in its decoding (`request-panic`) or in the
/// worker's loop when it starts (`worker-panic`). Unset, nothing is looked at.
struct Inject {
    request_panic: Option<String>,
    worker_panic: Option<String>,
}

fn inject() -> Option<&'static Inject> {
    static INJECT: std::sync::OnceLock<Option<Inject>> = std::sync::OnceLock::new();
    INJECT
        .get_or_init(|| {
            let spec = std::env::var("DUET_INJECT_FAULT").ok()?;
            let mut i = Inject {
                request_panic: None,
                worker_panic: None,
            };
            for part in spec.split(',') {
                match part.split_once(':') {
                    Some(("request-panic", t)) => i.request_panic = Some(t.to_string()),
                    Some(("worker-panic", t)) => i.worker_panic = Some(t.to_string()),
                    _ => tracing::warn!(part, "DUET_INJECT_FAULT: unknown fault"),
                }
            }
            tracing::warn!("fault injection is on (DUET_INJECT_FAULT): for tests only");
            Some(i)
        })
        .as_ref()
}

struct Worker {
    device: DeviceSpec,
    dev: Option<candle_core::Device>,
    slots: Vec<Arc<ModelSlot>>,
    /// The running batch of each loaded model, by slot index.
    batchers: Vec<Option<Batcher>>,
    /// The mapped files of each slot's models in use (a reloaded model's old one runs
    /// until its batch ends), watched for reads past their end, by slot index.
    mapped: Vec<Vec<MappedFile<Model>>>,
}

/// One loaded model's scheduler and KV cache.
struct Batcher {
    model: Arc<Model>,
    sched: Scheduler<JobSeq>,
    kv: crate::model::qwen2::PagedKv,
}

impl Batcher {
    fn new(model: Arc<Model>, slot: &ModelSlot) -> Result<Self, EngineError> {
        let per_block = model.weights.kv_bytes_per_block().max(1);
        let bytes = slot.kv_cache_bytes.unwrap_or_else(|| {
            let positions = super::sampling::DEFAULT_NUM_CTX * slot.parallel;
            positions.div_ceil(crate::model::qwen2::KV_BLOCK) as u64 * per_block
        });
        // At least room for one sequence of the default context.
        let min_blocks =
            super::sampling::DEFAULT_NUM_CTX.div_ceil(crate::model::qwen2::KV_BLOCK) + 1;
        let n_blocks = ((bytes / per_block) as usize).max(min_blocks);
        let mut kv = model.weights.new_paged_kv(n_blocks)?;
        kv.make_resident();
        tracing::info!(
            model = %slot.name,
            blocks = n_blocks,
            positions = n_blocks * crate::model::qwen2::KV_BLOCK,
            mib = (n_blocks as u64 * per_block) >> 20,
            parallel = slot.parallel,
            "KV cache ready"
        );
        Ok(Self {
            sched: Scheduler::new(
                BlockPool::new(n_blocks, crate::model::qwen2::KV_BLOCK),
                Limits {
                    max_running: slot.parallel,
                    step_tokens: STEP_TOKENS,
                    step_time: Some(STEP_TIME),
                },
            ),
            model,
            kv,
        })
    }
}

impl Worker {
    fn start(device: DeviceSpec, slots: Vec<Arc<ModelSlot>>, life: Lifecycle) -> Self {
        // The device is created once, here, and only this thread drives it.
        let dev = match crate::model::create_device(device) {
            Ok(dev) => Some(dev),
            Err(e) => {
                for slot in &slots {
                    tracing::error!(model = %slot.name, %device, error = %e, "device unavailable: model not loaded");
                    slot.load.send_replace(Load::Failed(e.to_string()));
                }
                None
            }
        };
        let mut w = Self {
            device,
            dev,
            batchers: slots.iter().map(|_| None).collect(),
            mapped: slots.iter().map(|_| Vec::new()).collect(),
            slots,
        };
        if life.preload {
            for i in 0..w.slots.len() {
                w.load(i);
                w.loaded(&w.slots[i]);
            }
        }
        w
    }

    /// Loads the model of slot `i` if it is not in memory; true when it is ready.
    fn load(&mut self, i: usize) -> bool {
        let slot = self.slots[i].clone();
        match &*slot.load.borrow() {
            Load::Ready(_) => return true,
            Load::Failed(_) | Load::Absent(_) => return false,
            _ => {}
        }
        let Some(dev) = &self.dev else { return false };
        let Some(file) = slot.file() else {
            slot.load
                .send_replace(Load::Absent("its weights are not on disk".into()));
            return false;
        };
        slot.load.send_replace(Load::Loading);
        let loaded =
            catch(|| load_and_warm(&slot, &file.path, self.device, dev)).unwrap_or_else(|panic| {
                slot.stats.request_panics.fetch_add(1, Ordering::Relaxed);
                Err(EngineError::Load {
                    path: file.path.display().to_string(),
                    message: format!("internal error while loading: {panic}"),
                })
            });
        match loaded {
            Ok((model, mapped)) => {
                self.mapped[i].extend(mapped);
                slot.load.send_replace(Load::Ready(model));
                true
            }
            Err(e) => {
                tracing::error!(model = %slot.name, device = %self.device, error = %e, "model failed to load");
                slot.load.send_replace(Load::Failed(e.to_string()));
                false
            }
        }
    }

    fn unload(&self, slot: &ModelSlot) {
        if slot.load.send_if_modified(|s| {
            if matches!(s, Load::Ready(_)) {
                *s = Load::Unloaded;
                true
            } else {
                false
            }
        }) {
            slot.set_expiry(None);
            tracing::info!(model = %slot.name, device = %self.device, "unloaded");
        }
    }

    /// After a model's last queued job: start its keep-alive, or unload it now for a
    /// keep-alive of zero.
    fn idle(&self, slot: &ModelSlot) {
        if slot.queue_depth() + slot.in_flight() > 0 || !slot.is_ready() {
            return;
        }
        let k = slot.keep_alive();
        if k.is_zero() {
            self.unload(slot);
        } else {
            slot.set_expiry(k.deadline(Instant::now()));
        }
    }

    /// After a load: the request that asked for it is about to submit its job, so even
    /// a keep-alive of zero leaves the model a grace period to receive it.
    fn loaded(&self, slot: &ModelSlot) {
        if slot.queue_depth() > 0 || !slot.is_ready() {
            return;
        }
        let k = slot.keep_alive();
        let k = if k.is_zero() {
            KeepAlive(Some(LOAD_GRACE))
        } else {
            k
        };
        slot.set_expiry(k.deadline(Instant::now()));
    }

    /// Unloads every idle model whose keep-alive has run out; returns the next deadline.
    fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for slot in &self.slots {
            if slot.queue_depth() + slot.in_flight() > 0 || !slot.is_ready() {
                continue;
            }
            let at = *slot.expires.lock().unwrap_or_else(|e| e.into_inner());
            match at {
                Some(at) if at <= now => self.unload(slot),
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        next
    }

    fn slot_index(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.name == name)
    }

    fn busy(&self) -> bool {
        self.batchers.iter().flatten().any(|b| !b.sched.is_empty())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Load(name) => {
                if let Some(i) = self.slot_index(&name) {
                    self.load(i);
                    self.loaded(&self.slots[i]);
                }
            }
            Msg::Unload(name) => {
                if let Some(i) = self.slot_index(&name) {
                    self.idle(&self.slots[i]);
                }
            }
            Msg::Job(job, ticket) => {
                self.injected_worker_panic(&job);
                self.job(*job, ticket)
            }
            Msg::Remove(name) => {
                if let Some(i) = self.slot_index(&name) {
                    self.slots[i].set_expiry(None);
                    tracing::info!(model = %name, "weights removed: unloaded");
                }
            }
            Msg::Invalidate(name, why) => {
                if let Some(i) = self.slot_index(&name) {
                    self.end_batch(i, &format!("model '{name}' is unavailable: {why}"));
                }
            }
        }
    }

    /// Fails every request of slot `i`'s batch with `why` and frees its KV cache.
    fn end_batch(&mut self, i: usize, why: &str) {
        if let Some(mut b) = self.batchers[i].take() {
            for mut seq in b.sched.drain() {
                seq.fail(why);
            }
        }
        self.slots[i].stats.running.store(0, Ordering::Relaxed);
        self.idle(&self.slots[i]);
    }

    /// A test's injected fault: a panic in the loop itself, outside any request's guard.
    fn injected_worker_panic(&self, job: &Job) {
        let Some(marker) = inject().and_then(|i| i.worker_panic.as_deref()) else {
            return;
        };
        let Some(model) = self
            .slot_index(&job.model)
            .and_then(|i| self.slots[i].model())
        else {
            return;
        };
        if model
            .codec
            .decode(&job.prompt)
            .is_ok_and(|t| t.contains(marker))
        {
            panic!("injected fault: a panic in the worker's loop");
        }
    }

    /// After a panic escaped the loop: every running request fails (its batch may be
    /// half-stepped), the queued ones run when the loop starts again. After too many
    /// restarts in a row the models are failed instead, so the router sends elsewhere.
    fn restart(&mut self, why: &str, give_up: bool) {
        tracing::error!(device = %self.device, panic = %why, "the worker's loop panicked: its running requests fail and it starts again");
        let msg = format!(
            "internal error on {}: its worker restarted ({why})",
            self.device
        );
        for i in 0..self.slots.len() {
            self.slots[i]
                .stats
                .worker_panics
                .fetch_add(1, Ordering::Relaxed);
            self.end_batch(i, &msg);
        }
        if give_up {
            for slot in &self.slots {
                slot.load.send_replace(Load::Failed(format!(
                    "its worker on {} failed {MAX_RESTARTS} times within a minute: {why}",
                    self.device
                )));
            }
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Msg>) {
        loop {
            if self.busy() {
                // Between steps: take what arrived, then one step of each busy model.
                loop {
                    match rx.try_recv() {
                        Ok(m) => self.handle(m),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                }
                self.step_all();
                continue;
            }
            self.drop_unloaded();
            let msg = match self.expire() {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
            };
            self.handle(msg);
        }
    }

    /// Frees the KV cache of models that are no longer loaded, and stops watching the
    /// files of models nothing runs on any more.
    fn drop_unloaded(&mut self) {
        for i in 0..self.slots.len() {
            let current = self.slots[i].model();
            let b = &mut self.batchers[i];
            let stale = match (b.as_ref(), &current) {
                (Some(b), Some(m)) => !Arc::ptr_eq(&b.model, m),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if stale && b.as_ref().is_some_and(|b| b.sched.is_empty()) {
                *b = None;
            }
            let running = self.batchers[i].as_ref().map(|b| &b.model);
            self.mapped[i].retain(|m| {
                current.as_ref().is_some_and(|c| Arc::ptr_eq(c, m.kept()))
                    || running.is_some_and(|r| Arc::ptr_eq(r, m.kept()))
            });
        }
    }

    /// One scheduler step of every model with work, in turn.
    fn step_all(&mut self) {
        for i in 0..self.slots.len() {
            let Some(b) = self.batchers[i].as_mut() else {
                continue;
            };
            if b.sched.is_empty() {
                continue;
            }
            let slot = self.slots[i].clone();
            let mapped = self.mapped[i]
                .iter()
                .find(|m| Arc::ptr_eq(m.kept(), &b.model));
            let cut_short = || mapped.is_some_and(|m| m.faulted());
            let path = slot.file().map(|f| f.path.display().to_string());
            let stepped = catch(|| {
                super::generate::step_checked(&b.model, &mut b.sched, &mut b.kv, || {
                    if cut_short() {
                        return Err(EngineError::Load {
                            path: path.clone().unwrap_or_default(),
                            message: "the file was cut short while it was served".into(),
                        });
                    }
                    Ok(())
                })
            });
            match stepped {
                Ok(Ok((done, report))) => {
                    drop(done);
                    slot.stats.record(&report);
                }
                Ok(Err(_)) if cut_short() => {
                    let why = format!(
                        "its weights file {} was cut short while it was served (a read past its new end)",
                        path.as_deref().unwrap_or("?")
                    );
                    tracing::error!(model = %slot.name, reason = %why, "model unavailable");
                    slot.load.send_replace(Load::Failed(why.clone()));
                    self.end_batch(i, &format!("model '{}' is unavailable: {why}", slot.name));
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(model = %slot.name, error = %e, "forward pass failed: its requests end with the error");
                    for mut seq in b.sched.drain() {
                        seq.fail(&e.to_string());
                    }
                }
                Err(panic) => {
                    slot.stats.batch_panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(model = %slot.name, %panic, "a forward pass panicked: its batch's requests fail");
                    self.end_batch(
                        i,
                        &format!(
                            "internal error in a forward pass of '{}': {panic}",
                            slot.name
                        ),
                    );
                    continue;
                }
            }
            let (empty, running) = (b.sched.is_empty(), b.sched.running());
            slot.stats.running.store(running as u64, Ordering::Relaxed);
            if empty {
                self.idle(&slot);
            }
        }
    }

    /// A job that will not run: it leaves the queue (its ticket), its client gets `why`.
    fn refuse(
        &self,
        slot: &ModelSlot,
        events: &tokio::sync::mpsc::Sender<Event>,
        ticket: Ticket,
        why: Option<String>,
    ) {
        drop(ticket);
        if let Some(why) = why {
            let _ = events.try_send(Event::Error(why));
        }
        self.idle(slot);
    }

    /// Starts a job; a panic while doing so fails that job only.
    fn job(&mut self, job: Job, ticket: Ticket) {
        let Some(i) = self.slot_index(&job.model) else {
            let _ = job.events.try_send(Event::Error(format!(
                "model '{}' is not on {}",
                job.model, self.device
            )));
            return;
        };
        let events = job.events.clone();
        if let Err(panic) = catch(|| self.start_job(i, job, ticket)) {
            let slot = &self.slots[i];
            slot.stats.request_panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(model = %slot.name, %panic, "a request panicked while starting: it fails, the worker goes on");
            let _ = events.try_send(Event::Error(format!(
                "internal error while starting the request: {panic}"
            )));
            self.idle(slot);
        }
    }

    fn start_job(&mut self, i: usize, job: Job, ticket: Ticket) {
        let slot = self.slots[i].clone();
        if job.events.is_closed() {
            return self.refuse(&slot, &job.events, ticket, None); // the client gave up while queued
        }
        // Unloaded between the request's wait and now (its keep-alive ran out): load again.
        let start = Instant::now();
        let was_ready = slot.is_ready();
        let model = if self.load(i) { slot.model() } else { None };
        let Some(model) = model else {
            let why = slot.failure().unwrap_or_else(|| "not loaded".into());
            let why = format!("model '{}' is unavailable: {why}", slot.name);
            return self.refuse(&slot, &job.events, ticket, Some(why));
        };
        let mut load_wait = job.load_wait;
        if !was_ready {
            load_wait += start.elapsed();
        }
        let fresh = match &self.batchers[i] {
            Some(b) => !Arc::ptr_eq(&b.model, &model) && b.sched.is_empty(),
            None => true,
        };
        if fresh {
            match Batcher::new(model.clone(), &slot) {
                Ok(b) => self.batchers[i] = Some(b),
                Err(e) => return self.refuse(&slot, &job.events, ticket, Some(e.to_string())),
            }
        }
        let Some(b) = self.batchers[i].as_mut() else {
            return;
        };
        let capacity = b.sched.capacity();
        let max_ctx = model
            .weights
            .max_positions()
            .min(capacity.saturating_sub(1));
        let poison = inject()
            .and_then(|i| i.request_panic.as_deref())
            .is_some_and(|m| model.codec.decode(&job.prompt).is_ok_and(|t| t.contains(m)));
        let prepared = Decoding::new(job.prompt, &job.options, max_ctx, &model.name).and_then(
            |(d, tokens)| {
                let d = match job.constraint {
                    Some(c) => d.with_constraint(c),
                    None => d,
                };
                let d = match job.logprobs {
                    Some(top) => d.with_logprobs(top),
                    None => d,
                };
                let d = if job.ignore_stop {
                    d.ignore_stop_tokens()
                } else {
                    d
                };
                match job.score_from {
                    Some(from) => d.scoring(from).map(|d| (d, tokens)),
                    None => Ok((d, tokens)),
                }
            },
        );
        let (decoding, tokens) = match prepared {
            Ok(r) => r,
            Err(e) => {
                let events = job.events;
                return self.refuse(&slot, &events, ticket, Some(e.to_string()));
            }
        };
        let seq = JobSeq {
            model: b.model.clone(),
            slot: slot.clone(),
            decoding,
            events: job.events,
            enqueued: job.enqueued,
            load_wait,
            logprobs: Vec::new(),
            queued: Some(ticket),
            started: false,
            gone: false,
            backlog: Default::default(),
            taken: Instant::now(),
            poison,
        };
        if let Err((e, mut seq)) = b.sched.add(tokens, seq) {
            // Not expected (num_ctx is capped to the pool), but never lose the request.
            seq.fail(&format!("the scheduler refused the request: {e}"));
        }
    }
}

/// A request running in a model's scheduler: its decoding, and where its output goes.
struct JobSeq {
    model: Arc<Model>,
    slot: Arc<ModelSlot>,
    decoding: Decoding,
    events: tokio::sync::mpsc::Sender<Event>,
    enqueued: Instant,
    load_wait: Duration,
    /// Log probabilities of tokens whose text is held back wait for the next text.
    logprobs: Vec<Logprob>,
    /// Its place in the queue count until it is admitted.
    queued: Option<Ticket>,
    /// Admitted (counted in flight rather than pending).
    started: bool,
    /// The client went away.
    gone: bool,
    /// Events its client has not taken yet: the worker never waits for one slow reader
    /// while other sequences share its steps.
    backlog: std::collections::VecDeque<Event>,
    /// When its client last took an event (or had nothing left to take).
    taken: Instant,
    /// A test's injected fault: panic in its decoding.
    poison: bool,
}

/// Events a client may leave unread before it counts as gone (a stalled reader).
const MAX_BACKLOG: usize = 8192;

impl JobSeq {
    /// Whether its client has taken nothing for longer than the stall timeout while
    /// events wait for it.
    fn stalled(&self) -> bool {
        !self.backlog.is_empty() && self.taken.elapsed() > self.slot.stall_timeout
    }

    fn send(&mut self, e: Event) {
        use tokio::sync::mpsc::error::TrySendError;
        if self.gone {
            return;
        }
        self.backlog.push_back(e);
        while let Some(e) = self.backlog.pop_front() {
            match self.events.try_send(e) {
                Ok(()) => self.taken = Instant::now(),
                Err(TrySendError::Full(e)) => {
                    self.backlog.push_front(e);
                    break;
                }
                Err(TrySendError::Closed(_)) => {
                    tracing::info!(model = %self.model.name, "client went away: generation stopped");
                    self.gone = true;
                    self.backlog.clear();
                    return;
                }
            }
        }
        if self.backlog.len() > MAX_BACKLOG || self.stalled() {
            tracing::warn!(model = %self.model.name, unread = self.backlog.len(), "client stopped reading its stream: generation stopped");
            self.gone = true;
            self.backlog.clear();
        }
    }

    fn fail(&mut self, why: &str) {
        self.send(Event::Error(why.to_string()));
    }
}

impl Sequence for JobSeq {
    fn admitted(&mut self, cached: usize) {
        if !self.started {
            self.started = true;
            self.slot.in_flight.fetch_add(1, Ordering::AcqRel);
            self.queued = None;
            self.send(Event::Started {
                queue_wait: self.enqueued.elapsed(),
            });
        }
        self.decoding.admitted(cached);
    }

    fn advance(&mut self, tokens: &[u32], logits: &[f32]) -> Advance {
        let finish = Advance {
            token: None,
            then: Then::Finish,
        };
        let (poison, codec, decoding) = (self.poison, &self.model.codec, &mut self.decoding);
        let advanced = catch(|| {
            if poison {
                panic!("injected fault: a panic in one request's decoding");
            }
            decoding.advance(codec, tokens, logits)
        });
        let (piece, advance) = match advanced {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.fail(&e.to_string());
                return finish;
            }
            Err(panic) => {
                self.slot
                    .stats
                    .request_panics
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(model = %self.model.name, %panic, "a request's decoding panicked: it fails, its batch goes on");
                self.fail(&format!("internal error while generating: {panic}"));
                return finish;
            }
        };
        if let Some(p) = piece {
            self.logprobs.extend(p.logprob);
            if !p.text.is_empty() {
                if !self.logprobs.is_empty() {
                    let l = std::mem::take(&mut self.logprobs);
                    self.send(Event::Logprobs(l));
                }
                self.send(Event::Text(p.text));
            }
        }
        if self.gone {
            return finish;
        }
        if advance.then == Then::Finish {
            if self.decoding.scores_from().is_some() {
                match self.decoding.take_scores() {
                    Some(scores) => self.send(Event::Logprobs(scores)),
                    None => {
                        self.fail("internal error: the text was not scored completely");
                        return advance;
                    }
                }
            }
            if !self.logprobs.is_empty() {
                let l = std::mem::take(&mut self.logprobs);
                self.send(Event::Logprobs(l));
            }
            let mut summary = self.decoding.summary();
            summary.load_duration = self.load_wait;
            self.send(Event::Done(summary));
        }
        advance
    }

    fn cancelled(&self) -> bool {
        self.gone || self.events.is_closed() || self.stalled()
    }

    fn scores_from(&self) -> Option<usize> {
        self.decoding.scores_from()
    }

    fn observe(&mut self, tokens: &[u32], at: usize, logits: &[f32]) {
        self.decoding.observe(&self.model.codec, tokens, at, logits);
    }
}

impl Drop for JobSeq {
    fn drop(&mut self) {
        // What the client has not taken yet goes on being delivered off this thread,
        // for as long as the client keeps taking it.
        if !self.gone && !self.backlog.is_empty() {
            let (events, backlog) = (self.events.clone(), std::mem::take(&mut self.backlog));
            let stall = self.slot.stall_timeout;
            let _ = std::thread::Builder::new()
                .name("duet-deliver".into())
                .spawn(move || deliver(events, backlog, stall));
        }
        if self.started {
            self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Hands `backlog` to a slow client, giving up when it takes nothing for `stall`.
fn deliver(
    events: tokio::sync::mpsc::Sender<Event>,
    backlog: std::collections::VecDeque<Event>,
    stall: Duration,
) {
    use tokio::sync::mpsc::error::TrySendError;
    let mut taken = Instant::now();
    for mut e in backlog {
        loop {
            match events.try_send(e) {
                Ok(()) => {
                    taken = Instant::now();
                    break;
                }
                Err(TrySendError::Full(back)) if taken.elapsed() < stall => {
                    e = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    }
}

/// Loads a model and runs one short forward pass, so the first request does not pay
/// for lazy set-up (weight repacking, allocator growth, kernel compilation on GPUs).
/// Its mapped file is watched from before that first pass.
fn load_and_warm(
    slot: &ModelSlot,
    path: &std::path::Path,
    device: DeviceSpec,
    dev: &candle_core::Device,
) -> Result<(Arc<Model>, Option<MappedFile<Model>>), EngineError> {
    let start = Instant::now();
    tracing::info!(model = %slot.name, %device, path = %path.display(), "loading");
    let model = Arc::new(Model::load_on(&slot.name, path, device, dev)?);
    let mapped = MappedFile::register(path, model.clone());
    let warm = Options {
        temperature: 0.0,
        num_predict: 1,
        ..Options::default()
    };
    let prompt = model.tokenize("Hello")?;
    model.generate(prompt, &warm)?.collect_text()?;
    if mapped.as_ref().is_some_and(|m| m.faulted()) {
        return Err(EngineError::Load {
            path: path.display().to_string(),
            message: "the file was cut short while it was loading".into(),
        });
    }
    tracing::info!(model = %slot.name, %device, secs = start.elapsed().as_secs_f64(), "loaded and warm");
    Ok((model, mapped))
}
