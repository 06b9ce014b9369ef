//! `duet serve`: load every model of the layout on its device's worker, then answer the
//! Ollama and OpenAI-compatible APIs until SIGINT/SIGTERM, then drain: new requests get
//! 503 while the ones in flight finish (up to `--drain-timeout`), and it exits.
//!
//! Connections are served by hyper directly (not `axum::serve`) for the deadlines a
//! server facing slow or hostile clients needs: a client must send a request's headers
//! within the client timeout (hyper's header-read deadline, which also closes idle
//! keep-alive connections), its body within as long again (the API's body deadline), and
//! a socket whose writes make no progress for that long (a client that stopped
//! reading) is closed.

use crate::api::{self, guard::Drain, AppState, Limits};
use crate::config::Tier;
use crate::layout::Deployment;
use crate::model::GgufFile;
use crate::serving::worker::{self, ModelSlot, Placement};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT_HOST: &str = "127.0.0.1:11434";

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// host[:port], scheme allowed, as OLLAMA_HOST is written.
    pub host: String,
    /// Requests that may wait per model before 503.
    pub max_queue: usize,
    /// Sequences each model runs at once.
    pub parallel: usize,
    pub limits: Limits,
    pub origins: Option<String>,
    /// The key requests must bring (`--api-key`), if any.
    pub api_key: Option<String>,
    /// Preloading and the default keep-alive.
    pub lifecycle: worker::Lifecycle,
    /// How long a stopping server waits for the requests in flight.
    pub drain_timeout: Duration,
}

/// How long a stopping server waits for its requests in flight unless told otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses OLLAMA_HOST-style addresses: "0.0.0.0", ":8080", "http://host:1234", "[::1]:11434".
pub fn parse_host(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s)
        .trim_end_matches('/');
    let (host, port) = match s.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (s, "11434"), // bare IPv6
        Some((h, p)) => (h, p),
        None => (s, "11434"),
    };
    let host = match host.trim_start_matches('[').trim_end_matches(']') {
        "" => "127.0.0.1",
        "localhost" => "127.0.0.1",
        h => h,
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in host address '{s}'"))?;
    let ip: std::net::IpAddr = host.parse().with_context(|| {
        format!("bad host address '{s}' (expected an IP address, optionally with :port)")
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// Reads each placed model's file header and starts one worker per device.
fn start_workers(
    d: &Deployment,
    capacity: worker::Capacity,
    life: worker::Lifecycle,
) -> Result<Vec<Arc<ModelSlot>>> {
    let mut by_device: BTreeMap<_, Vec<Placement>> = BTreeMap::new();
    for p in &d.layout().place {
        let Some(m) = d.model(&p.model) else { continue };
        let file = match m.weights {
            Ok(path) => match GgufFile::open(&path).and_then(|g| g.info()) {
                Ok(info) => Ok(worker::SlotFile::new(path, info)),
                Err(e) => {
                    tracing::error!(model = %p.model, "unavailable: {e}");
                    continue;
                }
            },
            // Absent weights: listed nowhere until `duet pull` fetches them.
            Err(e) => {
                tracing::warn!(model = %p.model, "absent: {e}");
                Err(e.to_string())
            }
        };
        by_device.entry(p.device).or_default().push(Placement {
            name: p.model.clone(),
            file,
            kv_cache_bytes: p.kv_cache_mib.map(|m| m << 20),
        });
    }
    if !by_device.values().flatten().any(|p| p.file.is_ok()) {
        anyhow::bail!("no model of layout '{}' can be loaded", d.layout_name);
    }
    let mut slots = Vec::new();
    for (device, placements) in by_device {
        slots.extend(worker::spawn(device, placements, capacity, life));
    }
    Ok(slots)
}

/// Starts loading every embedding model whose folder is there (the others are logged
/// with the command that fetches them).
fn start_embedders(cfg: &crate::config::Config) -> Vec<Arc<crate::model::embed::EmbedSlot>> {
    cfg.embeddings
        .iter()
        .filter_map(
            |(name, spec)| match crate::hub::resolve_embedding(cfg, name, spec) {
                Ok(dir) => Some(crate::model::embed::EmbedSlot::start(name, dir)),
                Err(e) => {
                    tracing::warn!(model = %name, "unavailable: {e}");
                    None
                }
            },
        )
        .collect()
}

/// The embedding model of the learned router (`[routing] embedding`), as the server
/// loads it: until it is ready, or when it failed or is not configured, the classifier
/// routes by the keyword rules and says why.
fn router_embedder(
    cfg: &crate::config::Config,
    embedders: &[Arc<crate::model::embed::EmbedSlot>],
) -> crate::router::EmbedderSource {
    let name = cfg.routing.embedding.clone();
    match embedders.iter().find(|e| e.name == name).cloned() {
        Some(slot) => Arc::new(move || {
            slot.get().ok_or_else(|| match slot.failure() {
                Some(e) => format!("embedding model '{}' failed to load: {e}", slot.name),
                None => format!("embedding model '{}' is still loading", slot.name),
            })
        }),
        None => {
            let why = format!("embedding model '{name}' is not available (configured under [embeddings] and in the hf-hub cache?)");
            if cfg.routing.classifier == crate::config::ClassifierKind::Learned {
                tracing::warn!("learned router: {why}; routing by the keyword rules");
            }
            Arc::new(move || Err(why.clone()))
        }
    }
}

/// The routing decision log: DUET_ROUTING_LOG, else `[routing] log`, else none.
fn routing_log(cfg: &crate::config::Config) -> Result<Option<crate::router::log::DecisionLog>> {
    let path = std::env::var_os("DUET_ROUTING_LOG")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| cfg.routing.log.clone());
    let Some(path) = path else {
        return Ok(None);
    };
    let log = crate::router::log::DecisionLog::open(&path)
        .with_context(|| format!("opening the routing log {}", path.display()))?;
    tracing::info!(path = %path.display(), "logging routing decisions");
    Ok(Some(log))
}

/// Shows loading progress until every model is loaded (or failed).
async fn report_progress(state: Arc<AppState>) {
    let start = Instant::now();
    let multi = indicatif::MultiProgress::new();
    let bars: Vec<_> = state
        .slots
        .iter()
        .map(|s| {
            let bar = multi.add(indicatif::ProgressBar::new_spinner());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_message(format!("loading {} on {}", s.name, s.device));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        })
        .collect();
    let mut done = vec![false; bars.len()];
    loop {
        for (i, s) in state.slots.iter().enumerate() {
            if done[i] {
                continue;
            }
            match s.state() {
                worker::Load::Ready(_) => {
                    bars[i].finish_with_message(format!("{} ready on {}", s.name, s.device));
                    done[i] = true;
                }
                worker::Load::Unloaded => {
                    bars[i].finish_with_message(format!(
                        "{} loads on {} at its first request",
                        s.name, s.device
                    ));
                    done[i] = true;
                }
                worker::Load::Failed(e) => {
                    bars[i].abandon_with_message(format!("{} failed on {}: {e}", s.name, s.device));
                    done[i] = true;
                }
                worker::Load::Absent(_) => {
                    bars[i].finish_with_message(format!(
                        "{} is not on disk (duet pull {} fetches it)",
                        s.name, s.name
                    ));
                    done[i] = true;
                }
                worker::Load::Loading => {}
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed: Vec<&str> = state
        .slots
        .iter()
        .filter(|s| s.failure().is_some())
        .map(|s| s.name.as_str())
        .collect();
    if failed.is_empty() {
        tracing::info!(
            secs = start.elapsed().as_secs_f64(),
            "all models settled: ready"
        );
        eprintln!("duet is ready ({:.1}s)", start.elapsed().as_secs_f64());
    } else {
        tracing::warn!(?failed, "some models failed to load; serving the others");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Waits until nothing is queued, generating or being handled (or `timeout` passed),
/// then fires `done`.
async fn drained(
    state: Arc<AppState>,
    drain: Arc<Drain>,
    timeout: Duration,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let work: usize = state
            .slots
            .iter()
            .map(|s| s.queue_depth() + s.in_flight())
            .sum();
        // This counts the handlers of the 503s sent meanwhile too: they end at once.
        let busy = work + drain.active();
        if busy == 0 {
            tracing::info!("drained: every request in flight has finished");
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                requests = work,
                "drain timeout: stopping with requests unfinished"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = done.send(());
}

/// Bytes of a response a connection buffers before the answer stops being produced
/// (hyper's buffer, and the socket's send buffer, which the kernel doubles): streams go
/// out as they are generated, so a client that stops reading is noticed after a few
/// hundred tokens rather than megabytes of them, and holds little memory meanwhile.
const CONNECTION_BUFFER: usize = 64 << 10;
const SEND_BUFFER: u32 = 128 << 10;

/// The listening socket: accepted connections inherit its send buffer size.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_send_buffer_size(SEND_BUFFER)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts connections and serves `app` on each until a signal, then drains.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: Arc<AppState>,
    drain: Arc<Drain>,
    client_timeout: Duration,
    drain_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut signal = std::pin::pin!(shutdown_signal());
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let mut io = tokio_io_timeout::TimeoutStream::new(stream);
                io.set_write_timeout(Some(client_timeout));
                let io = TokioIo::new(Box::pin(io));
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(client_timeout)
                    .max_buf_size(CONNECTION_BUFFER)
                    .serve_connection(io, service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut signal, if done_tx.is_some() => {
                drain.start();
                tracing::info!("shutting down: new requests get 503 while the ones in flight finish");
                if let Some(done) = done_tx.take() {
                    tokio::spawn(drained(state.clone(), drain.clone(), drain_timeout, done));
                }
                tokio::spawn(async {
                    shutdown_signal().await;
                    tracing::warn!("a second signal: exiting now");
                    std::process::exit(130);
                });
            }
            _ = &mut done_rx => break,
        }
    }
    drop(listener);
    // The answers already generated are still being written: let them go out.
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain: closing them");
    }
}

pub fn serve(d: Deployment, opts: ServeOptions) -> Result<()> {
    let addr = parse_host(&opts.host)?;
    tracing::info!(
        cpu = %crate::kernels::CpuId::read(),
        kernels = %crate::kernels::kernels(),
        "CPU"
    );
    let capacity = worker::Capacity {
        max_queue: opts.max_queue,
        parallel: opts.parallel,
        stall_timeout: opts.limits.client_timeout,
    };
    let slots = start_workers(&d, capacity, opts.lifecycle)?;
    crate::serving::watch::spawn(slots.clone(), crate::serving::watch::WATCH_EVERY);
    tracing::info!(preload = opts.lifecycle.preload, keep_alive = %opts.lifecycle.keep_alive, "model lifecycle");
    let layout = d.layout();
    let chains = [Tier::Simple, Tier::Moderate, Tier::Complex]
        .into_iter()
        .map(|t| (t, layout.chain(t)))
        .collect();
    if slots.len() == 1 {
        tracing::warn!(model = %slots[0].name, "single-model mode: every request goes to this model");
    }
    let mut routed_names = vec!["auto".to_string()];
    routed_names.extend(d.config.routing.aliases.iter().cloned());
    let aliases = d
        .config
        .models
        .iter()
        .map(|(name, spec)| (name, &spec.aliases))
        .chain(d.config.embeddings.iter().map(|(n, s)| (n, &s.aliases)))
        .flat_map(|(name, aliases)| aliases.iter().map(move |a| (a.clone(), name.clone())))
        .collect();
    let embedders = start_embedders(&d.config);
    let classifier = crate::router::Classifier::new(d.config.routing.clone())?.with_learned(
        crate::router::cli::head(&d.config)?,
        router_embedder(&d.config, &embedders),
    );
    let routing_log = routing_log(&d.config)?;
    let state = Arc::new(AppState {
        slots,
        embedders,
        routed_names,
        classifier,
        routing_log,
        chains,
        aliases,
        limits: opts.limits.clone(),
        keep_alive: opts.lifecycle.keep_alive,
        config: d.config.clone(),
        copies: api::models::Copies::load(),
        metrics: Arc::new(crate::metrics::Metrics::new()?),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!(
            "duet listening on http://{} (layout {}): loading models",
            listener.local_addr()?,
            d.layout_name
        );
        let listen = listener.local_addr()?;
        if !listen.ip().is_loopback() && opts.api_key.is_none() {
            tracing::warn!(
                %listen,
                "listening beyond this machine without an API key: anyone who can reach \
                 the port can use the models (set --api-key or DUET_API_KEY)"
            );
        }
        tokio::spawn(report_progress(state.clone()));
        let drain = Arc::new(Drain::default());
        let access = api::guard::Access {
            listen,
            api_key: opts.api_key.clone(),
            drain: drain.clone(),
        };
        let app = api::router(state.clone(), opts.origins.clone(), access);
        serve_connections(
            listener,
            app,
            state,
            drain,
            opts.limits.client_timeout,
            opts.drain_timeout,
        )
        .await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_like_ollama_host() {
        let p = |s| parse_host(s).unwrap().to_string();
        assert_eq!(p("127.0.0.1:11434"), "127.0.0.1:11434");
        assert_eq!(p("0.0.0.0"), "0.0.0.0:11434");
        assert_eq!(p(":8080"), "127.0.0.1:8080");
        assert_eq!(p("http://localhost:1234/"), "127.0.0.1:1234");
        assert_eq!(p("[::1]:9000"), "[::1]:9000");
        assert!(parse_host("nowhere:x").is_err());
    }
}
