//! What every request passes on its way to a route, and what every error leaves as:
//! - the **Host check**: a listener on a loopback address answers only requests whose
//!   `Host` names this machine (`localhost`, `*.localhost`, a loopback address), so a web
//!   page cannot drive duet from the user's browser by DNS rebinding (Ollama's fix of
//!   CVE-2024-28224); others get 403;
//! - the optional **API key** (`--api-key` / `DUET_API_KEY`): every route but `/` and
//!   `/api/version` then needs `Authorization: Bearer KEY` (401 otherwise), compared in
//!   constant time;
//! - **draining**: once the server is stopping (SIGTERM/SIGINT), new requests get 503
//!   while the ones in flight finish;
//! - the **body deadline**: a request's whole body must arrive within the client timeout
//!   (408 otherwise), so a client trickling it byte by byte (slowloris) holds nothing
//!   for long; its size is checked as it arrives (413);
//! - **JSON errors**: an error no handler wrote (an unknown path, a wrong method, a body
//!   over the limit or not readable) leaves in the shape of its API: `{"error": "…"}` for
//!   Ollama's routes, `{"error": {"message", "type", …}}` under `/v1/`.

use super::openai::OpenAiError;
use super::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Who may use the API: the address the server listens on and the key, if any; and
/// whether the server is draining.
#[derive(Clone, Debug)]
pub struct Access {
    pub listen: SocketAddr,
    pub api_key: Option<String>,
    pub drain: Arc<Drain>,
}

/// The server's stop: once draining, requests are refused; `active` counts the
/// requests whose handlers are still running (streamed answers go on after that, and
/// are counted by their models' in-flight gauges).
#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    active: AtomicUsize,
}

impl Drain {
    /// From now on, new requests get 503.
    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests whose handlers are running.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(self.clone())
    }
}

/// A request being handled.
struct Active(Arc<Drain>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a request naming `host` (its `Host` header or authority; `None` when it sent
/// none, as HTTP/1.0 may) is let through by a listener on `listen`.
pub fn host_allowed(listen: &SocketAddr, host: Option<&str>) -> bool {
    if !listen.ip().is_loopback() {
        return true;
    }
    let Some(host) = host else {
        return true;
    };
    let host = host.trim().to_ascii_lowercase();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // "[::1]:11434"
        match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || port(tail) => ip.to_string(),
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, tail)) if port(&format!(":{tail}")) => name.to_string(),
            Some(_) => return false,
            None => host.clone(),
        }
    };
    let name = name.trim_end_matches('.');
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip == listen.ip(),
        Err(_) => false,
    }
}

/// ":digits"
fn port(tail: &str) -> bool {
    tail.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `given` equals `key`, in time that depends only on their lengths' maximum.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = (given.len() != key.len()) as u8;
    for i in 0..given.len().max(key.len()) {
        diff |= given.get(i).copied().unwrap_or(0) ^ key.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

/// Routes anyone may call without the key: what clients probe to find a server.
fn open_route(path: &str) -> bool {
    matches!(path, "/" | "/api/version")
}

/// An error in the shape of the API `path` belongs to.
fn error_for(path: &str, status: StatusCode, message: String) -> Response {
    let e = ApiError::new(status, message);
    if path.starts_with("/v1/") || path == "/v1" {
        OpenAiError::from(e).into_response()
    } else {
        e.into_response()
    }
}

/// The Host check, then the key, then whether the server is stopping.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let _active = access.drain.enter();
    let path = req.uri().path().to_string();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !host_allowed(&access.listen, host.as_deref()) {
        tracing::warn!(host = host.as_deref().unwrap_or(""), %path, "refused: foreign Host header");
        return error_for(
            &path,
            StatusCode::FORBIDDEN,
            "this server answers only requests addressed to localhost (Host header)".into(),
        );
    }
    if let Some(key) = &access.api_key {
        if !open_route(&path) {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.strip_prefix("Bearer ").or(h.strip_prefix("bearer ")))
                .map(str::trim);
            let ok = given.is_some_and(|g| same_key(g.as_bytes(), key.as_bytes()));
            if !ok {
                let mut r = error_for(
                    &path,
                    StatusCode::UNAUTHORIZED,
                    if given.is_some() {
                        "invalid API key".into()
                    } else {
                        "this server needs an API key: Authorization: Bearer KEY".into()
                    },
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
    }
    if access.drain.is_draining() {
        return error_for(
            &path,
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down: it finishes the requests in flight and takes no new ones"
                .into(),
        );
    }
    next.run(req).await
}

/// What a request's body may take: this many bytes, arriving within this long.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub deadline: Duration,
}

/// Reads the whole body before the handler runs, within the deadline (408) and the size
/// limit (413), then hands the handler the bytes.
pub async fn read_body(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    let path = req.uri().path().to_string();
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            })?;
            if buf.len() + chunk.len() > limits.max_bytes {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body larger than the server's limit of {} bytes",
                        limits.max_bytes
                    ),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(limits.deadline, read).await {
        Ok(Ok(())) => {}
        Ok(Err((status, message))) => return error_for(&path, status, message),
        Err(_) => {
            tracing::warn!(%path, received = buf.len(), "request body not received in time: refused");
            return error_for(
                &path,
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    limits.deadline.as_secs_f64()
                ),
            );
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(buf)))
        .await
}

/// Turns an error response that is not JSON (axum's own 404, 405, 413 and body
/// rejections) into the API's JSON error, keeping its status and headers.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::NOT_FOUND => format!("no route for {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => format!("{path} does not take {method}"),
        _ if !text.is_empty() => text,
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
    };
    let mut out = error_for(&path, status, message);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listeners_take_only_local_hosts() {
        let lo: SocketAddr = "127.0.0.1:11434".parse().unwrap();
        for ok in [
            None,
            Some("localhost"),
            Some("localhost:11434"),
            Some("LOCALHOST:1"),
            Some("app.localhost:3000"),
            Some("127.0.0.1"),
            Some("127.0.0.1:11434"),
            Some("127.1.2.3:80"),
            Some("[::1]:11434"),
            Some("[::1]"),
            Some("localhost."),
        ] {
            assert!(host_allowed(&lo, ok), "{ok:?}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:11434",
            "localhost.evil.com",
            "192.168.1.10:11434",
            "0.0.0.0:11434",
            "localhost:port",
            "[::1]x",
            "[::2]:80",
            "",
        ] {
            assert!(!host_allowed(&lo, Some(bad)), "{bad}");
        }
        // A listener on every address is reached by its names from elsewhere: no check.
        let any: SocketAddr = "0.0.0.0:11434".parse().unwrap();
        assert!(host_allowed(&any, Some("evil.example.com")));
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secre", b"secret"));
        assert!(!same_key(b"secret!", b"secret"));
        assert!(!same_key(b"Secret", b"secret"));
        assert!(!same_key(b"", b"secret"));
    }
}
