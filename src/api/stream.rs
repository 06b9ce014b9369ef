//! Turning a job's events into HTTP bodies: NDJSON lines (Ollama), SSE (OpenAI), or one
//! collected answer for non-streamed requests.

use super::ApiError;
use crate::serving::worker::Event;
use crate::serving::{Logprob, Summary};
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;
use futures_util::Stream;
use tokio::sync::mpsc::Receiver;

/// A job's events, recorded into the metrics as they are read.
pub struct Events {
    pub rx: Receiver<Event>,
    pub recorder: crate::metrics::Recorder,
}

impl Events {
    pub async fn recv(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await?;
        self.recorder.observe(&ev);
        Some(ev)
    }
}

/// The whole answer of a non-streamed request.
pub struct Collected {
    pub text: String,
    pub summary: Summary,
    /// Each token's log probability, when the request asked.
    pub logprobs: Vec<Logprob>,
}

/// Waits for the job to end and gathers its text.
pub async fn collect(mut events: Events) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Started { .. } => {}
            Event::Text(t) => text.push_str(&t),
            Event::Logprobs(l) => logprobs.extend(l),
            Event::Done(summary) => {
                return Ok(Collected {
                    text,
                    summary,
                    logprobs,
                })
            }
            Event::Error(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the worker stopped before the answer was complete",
    ))
}

/// What a streamed body is made of, in order.
pub enum Item {
    /// Text, and the log probabilities of its tokens (when asked for).
    Text(String, Vec<Logprob>),
    Done(Summary),
    Error(String),
}

/// The job's events as a stream of items; ends after Done or Error.
pub fn items(events: Events) -> impl Stream<Item = Item> + Send {
    // The state: the events, and the Done held back while trailing log probabilities
    // go out first (`Some(None)` once the stream is over).
    futures_util::stream::unfold(
        (events, None::<Option<Item>>),
        |(mut rx, held)| async move {
            match held {
                Some(None) => return None,
                Some(Some(item)) => return Some((item, (rx, Some(None)))),
                None => {}
            }
            let mut logprobs = Vec::new();
            loop {
                let last = match rx.recv().await {
                    Some(Event::Started { .. }) => continue,
                    Some(Event::Logprobs(l)) => {
                        logprobs.extend(l);
                        continue;
                    }
                    Some(Event::Text(t)) => return Some((Item::Text(t, logprobs), (rx, None))),
                    Some(Event::Done(s)) => Item::Done(s),
                    Some(Event::Error(e)) => Item::Error(e),
                    None => Item::Error("the worker stopped before the answer was complete".into()),
                };
                if logprobs.is_empty() {
                    return Some((last, (rx, Some(None))));
                }
                // Tokens whose text never came (the answer ended) keep their logprobs.
                return Some((Item::Text(String::new(), logprobs), (rx, Some(Some(last)))));
            }
        },
    )
}

/// A streamed body of text chunks with the given content type.
pub fn body_response<S>(content_type: &'static str, chunks: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    use futures_util::StreamExt;
    let body = Body::from_stream(chunks.map(Ok::<_, std::convert::Infallible>));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// One NDJSON line.
pub fn ndjson_line(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// One server-sent event carrying JSON (or the literal `[DONE]`).
pub fn sse_event(data: &str) -> String {
    format!("data: {data}\n\n")
}
