//! The HTTP API: Ollama's native routes (`ollama.rs`), the OpenAI-compatible ones
//! (`openai.rs`), and what they share: state, model lookup, body parsing, errors.

pub mod embed;
pub mod guard;
pub mod limits;
pub mod models;
pub mod ollama;
pub mod openai;
mod routing;
mod stream;
pub mod tools;

use crate::config::Tier;
use crate::model::Model;
use crate::router::{self, Classifier, Decision};
use crate::serving::worker::{Job, ModelSlot, SubmitError};
use crate::serving::Options;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Instant;

/// The Ollama version duet reports: clients gate features on it, so it names the
/// Ollama release whose API duet follows.
pub const OLLAMA_VERSION: &str = "0.12.6";

/// Server limits from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request body, bytes.
    pub max_body: usize,
    /// Upper bound on num_predict / max_tokens; requests asking for more (or for no
    /// limit) are capped here.
    pub max_predict: Option<i32>,
    /// Tokens a request that sets no num_predict (or -1) may generate; `None`:
    /// [`DEFAULT_PREDICT_PER_CTX`] times its num_ctx.
    pub default_predict: Option<i32>,
    /// How long a client may take to send a request's headers, then its body, and may
    /// leave a streamed answer unread.
    pub client_timeout: std::time::Duration,
}

/// Without num_predict, a generation ends after this many times its num_ctx tokens at
/// most (the context shift would let it run forever).
pub const DEFAULT_PREDICT_PER_CTX: usize = 4;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 32 << 20,
            max_predict: None,
            default_predict: None,
            client_timeout: crate::serving::worker::DEFAULT_STALL_TIMEOUT,
        }
    }
}

pub struct AppState {
    pub slots: Vec<Arc<ModelSlot>>,
    /// The embedding models (every layout's), loading or loaded.
    pub embedders: Vec<Arc<crate::model::embed::EmbedSlot>>,
    /// Names that mean "route this request" ("auto" and configured aliases).
    pub routed_names: Vec<String>,
    pub classifier: Classifier,
    /// Where routing decisions are logged (`[routing] log`, DUET_ROUTING_LOG).
    pub routing_log: Option<router::log::DecisionLog>,
    /// Tier → models to try in order.
    pub chains: Vec<(Tier, Vec<String>)>,
    /// Alias → canonical name.
    pub aliases: Vec<(String, String)>,
    pub limits: Limits,
    /// Keep-alive of a request that does not set one (OLLAMA_KEEP_ALIVE).
    pub keep_alive: crate::keep_alive::KeepAlive,
    /// The configuration the server runs (pull and delete find the files through it).
    pub config: crate::config::Config,
    /// Names made with /api/copy.
    pub copies: models::Copies,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A configured model whose weights are not on disk, as Ollama words a model not pulled.
pub fn absent(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("model '{model}' not found, try pulling it first"),
    )
}

/// An API error: the HTTP status and Ollama's `{"error": "..."}` message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(model: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("model '{model}' not found"))
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<crate::model::EngineError> for ApiError {
    fn from(e: crate::model::EngineError) -> Self {
        use crate::model::EngineError as E;
        let status = match e {
            E::Option(_) | E::EmptyPrompt | E::Template(_) | E::Grammar(_) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Parses a JSON body whatever its Content-Type says, as Ollama does (`curl -d` sends a
/// form content type). An empty body is an empty object.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// How a routed request was routed.
pub struct Route {
    pub decision: Decision,
    pub fallback: bool,
    pub skipped: Vec<String>,
    /// The fast model that drafts the answer first (`[routing.draft]`), when it does.
    pub draft: Option<Arc<ModelSlot>>,
    /// The decision's line in the routing log.
    pub log_id: Option<u64>,
    /// The client set a system prompt or num_predict (no tier policy then).
    pub client_set: bool,
}

/// A model picked for a request.
pub struct Target {
    pub slot: Arc<ModelSlot>,
    /// The name the client asked for ("auto" for a routed request).
    pub requested: String,
    pub routed: bool,
    pub route: Option<Route>,
    /// Set by [`loaded`]: the model, once in memory, and how long the request waited.
    pub model: Option<Arc<Model>>,
    pub load_wait: std::time::Duration,
}

impl Target {
    /// The target's weights file (404 while they are absent).
    pub fn file(&self) -> Result<Arc<crate::serving::worker::SlotFile>, ApiError> {
        self.slot.file().ok_or_else(|| absent(&self.requested))
    }

    /// Labels for the request counter: model, tier ("" when not routed), device.
    pub fn labels(&self) -> RequestLabels {
        RequestLabels {
            model: self.slot.name.clone(),
            tier: self
                .route
                .as_ref()
                .map(|r| r.decision.tier.to_string())
                .unwrap_or_default(),
            device: self.slot.device.to_string(),
        }
    }

    /// The X-Duet-* headers every routed response carries.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let Some(r) = &self.route else {
            return Vec::new();
        };
        let h = |name: &'static str, v: String| {
            HeaderValue::from_str(&v)
                .ok()
                .map(|v| (HeaderName::from_static(name), v))
        };
        [
            h("x-duet-tier", r.decision.tier.to_string()),
            h("x-duet-model", self.slot.name.clone()),
            h("x-duet-confidence", format!("{:.3}", r.decision.confidence)),
            h("x-duet-fallback", r.fallback.to_string()),
            r.draft
                .as_ref()
                .and_then(|d| h("x-duet-draft", d.name.clone())),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Which model served a request, for the request counter (a response extension).
#[derive(Debug, Clone, Default)]
pub struct RequestLabels {
    pub model: String,
    pub tier: String,
    pub device: String,
}

/// What a handler hands back about its target: routing headers and metric labels.
pub struct Served(pub Vec<(HeaderName, HeaderValue)>, pub RequestLabels);

impl Served {
    pub fn of(t: &Target) -> Self {
        Self(t.headers(), t.labels())
    }
}

/// Adds a target's routing headers and labels to whatever the handler answered.
pub fn with_headers<E: IntoResponse>(served: Served, result: Result<Response, E>) -> Response {
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    for (k, v) in served.0 {
        resp.headers_mut().insert(k, v);
    }
    resp.extensions_mut().insert(served.1);
    resp
}

/// Counts every routed-to endpoint's requests by model, tier, device, endpoint, status.
async fn count_requests(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    path: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = path.map(|p| p.as_str().to_string()).unwrap_or_default();
    let resp = next.run(req).await;
    if endpoint != "/metrics" {
        let l = resp
            .extensions()
            .get::<RequestLabels>()
            .cloned()
            .unwrap_or_default();
        st.metrics
            .requests
            .with_label_values(&[
                &l.model,
                &l.tier,
                &l.device,
                &endpoint,
                resp.status().as_str(),
            ])
            .inc();
    }
    resp
}

/// `GET /metrics`: refreshes the gauges from the workers, then renders everything.
async fn metrics(axum::extract::State(st): axum::extract::State<Arc<AppState>>) -> Response {
    let m = &st.metrics;
    for s in &st.slots {
        m.queue_depth
            .with_label_values(&[&s.name])
            .set(s.queue_depth() as i64);
        m.in_flight
            .with_label_values(&[&s.name])
            .set(s.in_flight() as i64);
        m.loaded
            .with_label_values(&[&s.name, &s.device.to_string()])
            .set(i64::from(s.is_ready()));
        m.sync_steps(&s.name, &s.stats);
    }
    // A worker restart counts on each of its device's models: once per device here.
    let mut restarts = std::collections::BTreeMap::<String, u64>::new();
    for s in &st.slots {
        let n = s
            .stats
            .worker_panics
            .load(std::sync::atomic::Ordering::Relaxed);
        let e = restarts.entry(s.device.to_string()).or_default();
        *e = (*e).max(n);
    }
    for (device, n) in restarts {
        let c = m.worker_restarts.with_label_values(&[&device]);
        c.inc_by(n.saturating_sub(c.get()));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

impl AppState {
    pub fn slot(&self, canonical: &str) -> Option<&Arc<ModelSlot>> {
        self.slots.iter().find(|s| s.name == canonical)
    }

    /// The embedding model a name (or alias, or `name:latest`) means.
    pub fn embedder(&self, name: &str) -> Option<&Arc<crate::model::embed::EmbedSlot>> {
        let canonical = self.canonical(name.trim());
        self.embedders.iter().find(|e| e.name == canonical)
    }

    /// The configured name a requested name means: `name:latest` is `name`; aliases of
    /// models.toml and copies made with /api/copy lead to their model.
    pub fn canonical(&self, name: &str) -> String {
        let name = name.strip_suffix(":latest").unwrap_or(name);
        if let Some(c) = self.copies.get(name) {
            return c;
        }
        self.aliases
            .iter()
            .find(|(a, _)| a == name)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| name.to_string())
    }

    /// Resolves a requested model name: missing → 400, unknown → 404. A routed name
    /// (`auto`, a routing alias) classifies `request()` and takes its tier's model.
    pub fn target<'r>(
        &self,
        name: Option<&str>,
        request: impl FnOnce() -> router::Request<'r>,
    ) -> Result<Target, ApiError> {
        let name = name.map(str::trim).unwrap_or_default();
        if name.is_empty() {
            return Err(ApiError::bad_request("model is required"));
        }
        let routed = name.strip_suffix(":latest").unwrap_or(name);
        if !self.routed_names.iter().any(|r| r == routed) {
            let slot = self
                .slot(&self.canonical(name))
                .ok_or_else(|| ApiError::not_found(name))?;
            if slot.is_absent() {
                return Err(absent(name));
            }
            return Ok(Target {
                slot: slot.clone(),
                requested: name.to_string(),
                routed: false,
                route: None,
                model: None,
                load_wait: Default::default(),
            });
        }
        let req = request();
        let mut decision = classify_off_the_reactor(&self.classifier, &req);
        if let Some(t) = routing::forced_tier() {
            decision.force(t);
        }
        let chain = self
            .chains
            .iter()
            .find(|(t, _)| *t == decision.tier)
            .map(|(_, c)| c.as_slice())
            .unwrap_or_default();
        let pick = router::pick(chain, &self.slots).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no model is available for {} requests", decision.tier),
            )
        })?;
        self.metrics
            .routing
            .with_label_values(&[&decision.tier.to_string(), &pick.fallback.to_string()])
            .inc();
        let draft = self.draft_for(&decision, &pick.slot);
        tracing::info!(
            tier = %decision.tier,
            confidence = decision.confidence,
            by = ?decision.by,
            model = %pick.slot.name,
            fallback = pick.fallback,
            draft = ?draft.as_ref().map(|d| &d.name),
            skipped = ?pick.skipped,
            reasons = ?decision.reasons,
            "routed"
        );
        let log_id = self.routing_log.as_ref().map(|log| {
            log.decision(
                &req,
                &decision,
                &pick.slot.name,
                pick.fallback,
                draft.as_ref().map(|d| d.name.as_str()),
            )
        });
        Ok(Target {
            slot: pick.slot,
            requested: name.to_string(),
            routed: true,
            route: Some(Route {
                decision,
                fallback: pick.fallback,
                skipped: pick.skipped,
                draft,
                log_id,
                client_set: req.system.is_some_and(|s| !s.is_empty()) || req.num_predict.is_some(),
            }),
            model: None,
            load_wait: Default::default(),
        })
    }

    /// Every model has settled (loaded and warm, left to load on demand, or failed) and
    /// at least one answers: a model that cannot load (missing GPU, bad file) does not
    /// hold the rest back.
    pub fn ready(&self) -> bool {
        self.slots.iter().all(|s| !s.is_loading())
            && self
                .slots
                .iter()
                .any(|s| s.failure().is_none() && !s.is_absent())
            && self
                .embedders
                .iter()
                .all(|e| e.get().is_some() || e.failure().is_some())
    }

    /// Gives a request without num_predict the server's default limit, then applies the
    /// server's num_predict cap.
    pub fn cap_predict(&self, opts: &mut Options, model: &Model) {
        if opts.num_predict == -1 {
            let ctx = opts.num_ctx.min(model.weights.max_positions());
            opts.num_predict = self.limits.default_predict.unwrap_or_else(|| {
                i32::try_from(DEFAULT_PREDICT_PER_CTX * ctx).unwrap_or(i32::MAX)
            });
        }
        if let Some(cap) = self.limits.max_predict {
            if opts.num_predict < 0 || opts.num_predict > cap {
                opts.num_predict = cap;
            }
        }
    }
}

/// What a job asks for beyond its prompt and sampling options.
#[derive(Default)]
pub struct Extras {
    /// Keep the output to a grammar (structured output, required tool calls).
    pub constraint: Option<crate::model::grammar::Constraint>,
    /// Report each token's log probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Score the prompt from this position instead of generating (see `Job::score_from`).
    pub score_from: Option<usize>,
}

/// `logprobs` / `top_logprobs` as Ollama and OpenAI's chat take them: off unless
/// `logprobs` is true; `top_logprobs` from 0 to 20.
pub fn logprobs_of(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    let max = crate::serving::MAX_TOP_LOGPROBS as i64;
    match top {
        Some(n) if !(0..=max).contains(&n) => Err(ApiError::bad_request(format!(
            "top_logprobs must be between 0 and {max}"
        ))),
        _ if logprobs != Some(true) => Ok(None),
        n => Ok(Some(n.unwrap_or(0) as usize)),
    }
}

/// Log probabilities as both APIs write them: token, logprob, bytes, top_logprobs.
pub fn logprobs_json(l: &[crate::serving::Logprob]) -> serde_json::Value {
    serde_json::to_value(l).unwrap_or_default()
}

/// A submitted job: the event stream and what it needs to answer.
pub struct Running {
    pub events: stream::Events,
    pub model: Arc<Model>,
    pub target: Target,
}

impl AppState {
    /// Hands prompt tokens to the target's worker; the events come back recorded.
    pub fn submit(
        &self,
        target: Target,
        prompt: Vec<u32>,
        options: Options,
    ) -> Result<Running, ApiError> {
        self.submit_with(target, prompt, options, Extras::default())
    }

    /// As [`submit`](Self::submit), with a grammar or log probabilities.
    pub fn submit_with(
        &self,
        target: Target,
        prompt: Vec<u32>,
        options: Options,
        extras: Extras,
    ) -> Result<Running, ApiError> {
        let model = target.model.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("model '{}' was not loaded", target.slot.name),
            )
        })?;
        // Routed to a smaller model than the layout's largest: routing saved time.
        let params = |s: &ModelSlot| s.file().map_or(0, |f| f.info.parameter_count);
        let largest = self.slots.iter().max_by_key(|s| params(s));
        let larger = largest
            .filter(|l| target.routed && l.name != target.slot.name)
            .map(|l| {
                let ratio = params(l) as f64 / params(&target.slot).max(1) as f64;
                (l.name.clone(), ratio)
            });
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        target.slot.submit(Job {
            model: target.slot.name.clone(),
            prompt,
            options,
            constraint: extras.constraint,
            events: tx,
            enqueued: Instant::now(),
            load_wait: target.load_wait,
            logprobs: extras.logprobs,
            ignore_stop: false,
            score_from: extras.score_from,
        })?;
        let recorder = crate::metrics::Recorder::new(
            self.metrics.clone(),
            &target.slot.name,
            &target.slot.device.to_string(),
            larger,
        );
        Ok(Running {
            events: stream::Events { rx, recorder },
            model,
            target,
        })
    }
}

/// The target's model, loaded on its device first if it is not in memory (the request
/// waits while it loads, as Ollama's do); 503 only when it cannot load. `keep_alive` is
/// the request's (`null` or absent: the server's default).
pub async fn loaded(
    st: &AppState,
    target: &mut Target,
    keep_alive: &Option<serde_json::Value>,
) -> Result<Arc<Model>, ApiError> {
    let k = keep_alive_of(st, keep_alive)?;
    target.slot.set_keep_alive(k);
    let start = Instant::now();
    let model = target.slot.ready_model().await?;
    target.load_wait = start.elapsed();
    target.model = Some(model.clone());
    Ok(model)
}

/// A request's keep-alive, or the server's default.
pub fn keep_alive_of(
    st: &AppState,
    v: &Option<serde_json::Value>,
) -> Result<crate::keep_alive::KeepAlive, ApiError> {
    match v {
        None => Ok(st.keep_alive),
        Some(v) => Ok(crate::keep_alive::KeepAlive::from_json(v)
            .map_err(ApiError::bad_request)?
            .unwrap_or(st.keep_alive)),
    }
}

/// CORS as Ollama does it: localhost origins (and OLLAMA_ORIGINS, comma-separated, `*`
/// allowed) may call the API from a browser.
pub fn cors(origins_env: Option<String>) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let mut allowed: Vec<String> = Vec::new();
    for host in ["localhost", "127.0.0.1", "0.0.0.0"] {
        for scheme in ["http", "https"] {
            allowed.push(format!("{scheme}://{host}"));
            allowed.push(format!("{scheme}://{host}:*"));
        }
    }
    for extra in [
        "app://*",
        "file://*",
        "tauri://*",
        "vscode-webview://*",
        "vscode-file://*",
    ] {
        allowed.push(extra.to_string());
    }
    let mut any = false;
    if let Some(env) = origins_env {
        for o in env.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            if o == "*" {
                any = true;
            }
            allowed.push(o.to_string());
        }
    }
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ])
        .allow_headers(tower_http::cors::Any);
    if any {
        return layer.allow_origin(tower_http::cors::Any);
    }
    layer.allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
        origin
            .to_str()
            .map(|o| allowed.iter().any(|pat| origin_matches(pat, o)))
            .unwrap_or(false)
    }))
}

/// Glob match with `*` wildcards, as OLLAMA_ORIGINS patterns are written.
fn origin_matches(pattern: &str, origin: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == origin;
    }
    let mut rest = origin;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// Every route of the API, behind the Host check and key of `access` ([`guard`]).
pub fn router(state: Arc<AppState>, origins_env: Option<String>, access: guard::Access) -> Router {
    let max_body = state.limits.max_body;
    let body = guard::BodyLimits {
        max_bytes: max_body,
        deadline: state.limits.client_timeout,
    };
    let panics = state.metrics.clone();
    Router::new()
        .merge(ollama::routes())
        .merge(openai::routes())
        .merge(embed::routes())
        .merge(models::routes())
        .route("/metrics", axum::routing::get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            move |p: Box<dyn std::any::Any + Send>| {
                panics.panics.with_label_values(&["", "http"]).inc();
                let why = crate::serving::worker::panic_message(p.as_ref());
                tracing::error!(panic = %why, "a request handler panicked: that request fails");
                // Plain text: `json_errors` gives it the shape of the route's API.
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("internal error: {why}"),
                )
                    .into_response()
            },
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(body, guard::read_body))
        .layer(axum::middleware::from_fn(routing::read_forced_tier))
        .layer(axum::middleware::from_fn(guard::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            guard::guard,
        ))
        .layer(cors(origins_env))
        .with_state(state)
}

/// Classifies on this thread, telling tokio first (on its multi-threaded runtime) that
/// the thread blocks for a while, so the other tasks queued on it move to another worker
/// rather than wait: a classification reads the whole prompt (a tokenizer and a table
/// look-up; the keyword rules), and a prompt can be megabytes.
fn classify_off_the_reactor(c: &router::Classifier, req: &router::Request) -> router::Decision {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| c.classify(req))
        }
        _ => c.classify(req),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_globs() {
        assert!(origin_matches(
            "http://localhost:*",
            "http://localhost:3000"
        ));
        assert!(origin_matches("http://localhost", "http://localhost"));
        assert!(!origin_matches(
            "http://localhost",
            "http://localhost.evil.com"
        ));
        assert!(origin_matches(
            "https://*.example.com",
            "https://app.example.com"
        ));
        assert!(!origin_matches(
            "https://*.example.com",
            "https://example.org"
        ));
    }

    #[test]
    fn bodies_parse_as_json_or_fail_clearly() {
        let v: serde_json::Value = parse_body(b"  ").unwrap();
        assert_eq!(v, serde_json::json!({}));
        let e = parse_body::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("invalid JSON body"), "{}", e.message);
    }
}
