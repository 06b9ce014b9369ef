//! Bounds on the work one request can make the server do, checked before the work:
//! - a prompt is cut to what its num_ctx can hold **by bytes, before it is tokenized**
//!   (the head and the tail kept, as Ollama keeps them), so a 4 MB prompt of one word
//!   never goes whole through the BPE (whose cost grows faster than the word's length);
//! - rendering the chat template and tokenizing run on the blocking pool, never on the
//!   async threads that answer every other request;
//! - counts and sizes a request may send (messages, tools, schemas) are capped with a
//!   clear 400; the option caps (num_ctx, num_predict, stop sequences) are
//!   [`Options::validate`](crate::serving::Options::validate)'s.

use super::ApiError;
use crate::model::tokenizer::{ceil_boundary, floor_boundary, head_and_tail};
use axum::http::StatusCode;
use serde_json::Value;
use std::borrow::Cow;

/// Messages one chat request may hold.
pub const MAX_MESSAGES: usize = 4096;
/// Tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// The tools' definitions together, as JSON bytes (they are rendered into the prompt
/// and, for required calls, compiled into a grammar).
pub const MAX_TOOLS_BYTES: usize = 256 << 10;
/// A JSON schema for structured output, as JSON bytes (compiled into a grammar).
pub const MAX_SCHEMA_BYTES: usize = 64 << 10;
/// Inputs one embedding request may hold (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// Bytes of text kept per token of num_ctx when a prompt is cut before tokenizing.
/// Byte-level BPE never makes more tokens than bytes, and text runs 3 to 5 bytes a
/// token, so a prompt cut to 16 bytes a token still fills num_ctx, and the exact cut
/// (num_keep tokens at the front, the rest from the end) is then made on its tokens.
pub const BYTES_PER_TOKEN: usize = 16;

/// How a prompt is cut to a byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of prompt text kept in all.
    pub bytes: usize,
    /// Of those, bytes kept from the front (the rest come from the end).
    pub head: usize,
}

impl Budget {
    /// The budget of a request with context `num_ctx` (already capped to what the model
    /// holds) and `num_keep` tokens kept at the front when its prompt is too long.
    pub fn of(num_ctx: usize, num_keep: i32) -> Self {
        let bytes = num_ctx.saturating_mul(BYTES_PER_TOKEN);
        let keep = (num_keep.max(0) as usize).min(num_ctx / 2);
        Self {
            bytes,
            head: keep.saturating_mul(BYTES_PER_TOKEN).min(bytes / 2),
        }
    }
}

/// `text`, or its first `budget.head` and last `budget.bytes - budget.head` bytes when
/// it is longer than `budget.bytes` (cut at character boundaries).
pub fn cut(text: &str, budget: Budget) -> Cow<'_, str> {
    match head_and_tail(text, budget.bytes, budget.head) {
        None => Cow::Borrowed(text),
        Some((head, tail)) => Cow::Owned([head, tail].concat()),
    }
}

/// A fill-in-the-middle request's prefix and suffix cut to `budget.bytes` together:
/// what is next to the cursor matters, so the prefix keeps its end and the suffix its
/// start; the suffix gets at most a quarter unless the prefix needs less.
pub fn cut_fim<'a>(prefix: &'a str, suffix: &'a str, budget: Budget) -> (&'a str, &'a str) {
    let total = budget.bytes;
    if prefix.len() + suffix.len() <= total {
        return (prefix, suffix);
    }
    let suffix_room = suffix
        .len()
        .min((total / 4).max(total.saturating_sub(prefix.len())));
    let prefix_room = total - suffix_room;
    let p = ceil_boundary(prefix, prefix.len().saturating_sub(prefix_room));
    let s = floor_boundary(suffix, suffix_room);
    (&prefix[p..], &suffix[..s])
}

/// The budget of a request with `options` on `model` (num_ctx capped to what the model
/// holds).
pub fn budget(options: &crate::serving::Options, model: &crate::model::Model) -> Budget {
    Budget::of(
        options.num_ctx.min(model.weights.max_positions()),
        options.num_keep,
    )
}

/// A chat's prompt: the conversation (and tools) rendered with the model's template,
/// `opening` appended, cut to `budget` and tokenized, and the grammar of `format`
/// compiled, all off the async threads.
pub async fn prepare_chat(
    metrics: &crate::metrics::Metrics,
    model: &std::sync::Arc<crate::model::Model>,
    messages: Vec<crate::model::Message>,
    tools: Option<Vec<Value>>,
    opening: String,
    format: Option<crate::model::grammar::Format>,
    budget: Budget,
) -> Result<(Vec<u32>, Option<crate::model::grammar::Constraint>), ApiError> {
    let m = model.clone();
    blocking(metrics, move || {
        let text = m.render_chat_with_tools(&messages, tools.as_deref())? + &opening;
        let tokens = m.tokenize(&cut(&text, budget))?;
        let constraint = format.map(|f| m.constraint(&f)).transpose()?;
        Ok((tokens, constraint))
    })
    .await
}

/// Runs prompt preparation (template rendering, tokenizing) on the blocking pool; a
/// panic there fails this request with a 500 and is counted.
pub async fn blocking<T: Send + 'static>(
    metrics: &crate::metrics::Metrics,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_panic() {
                metrics.panics.with_label_values(&["", "http"]).inc();
                "internal error while preparing the prompt (a bug: see the server's log)"
            } else {
                "the server is shutting down"
            };
            tracing::error!(error = %e, "prompt preparation failed");
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, why))
        }
    }
}

/// At most [`MAX_MESSAGES`] messages.
pub fn check_messages(n: usize) -> Result<(), ApiError> {
    if n > MAX_MESSAGES {
        return Err(ApiError::bad_request(format!(
            "too many messages: {n} (at most {MAX_MESSAGES})"
        )));
    }
    Ok(())
}

/// At most [`MAX_EMBED_INPUTS`] inputs to embed.
pub fn check_inputs(n: usize) -> Result<(), ApiError> {
    if n > MAX_EMBED_INPUTS {
        return Err(ApiError::bad_request(format!(
            "too many inputs: {n} (at most {MAX_EMBED_INPUTS})"
        )));
    }
    Ok(())
}

/// How many bytes `v` takes as JSON, without writing it anywhere.
pub fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// At most [`MAX_TOOLS`] tools of at most [`MAX_TOOLS_BYTES`] together.
pub fn check_tools(tools: &[Value]) -> Result<(), ApiError> {
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::bad_request(format!(
            "too many tools: {} (at most {MAX_TOOLS})",
            tools.len()
        )));
    }
    let bytes: usize = tools.iter().map(json_len).sum();
    if bytes > MAX_TOOLS_BYTES {
        return Err(ApiError::bad_request(format!(
            "the tools' definitions take {bytes} bytes (at most {MAX_TOOLS_BYTES})"
        )));
    }
    Ok(())
}

/// A structured-output schema of at most [`MAX_SCHEMA_BYTES`].
pub fn check_schema(schema: &Value) -> Result<(), ApiError> {
    let bytes = json_len(schema);
    if bytes > MAX_SCHEMA_BYTES {
        return Err(ApiError::bad_request(format!(
            "the JSON schema takes {bytes} bytes (at most {MAX_SCHEMA_BYTES})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_prompts_are_untouched() {
        let b = Budget::of(4096, 4);
        assert!(matches!(cut("hello", b), Cow::Borrowed("hello")));
        let exact = "x".repeat(b.bytes);
        assert_eq!(cut(&exact, b).len(), b.bytes);
    }

    #[test]
    fn long_prompts_keep_head_and_tail_within_the_budget() {
        let b = Budget::of(8, 2);
        assert_eq!(
            b,
            Budget {
                bytes: 128,
                head: 32
            }
        );
        let text: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let c = cut(&text, b);
        assert_eq!(c.len(), 128);
        assert_eq!(&c[..32], &text[..32]);
        assert_eq!(&c[32..], &text[1000 - 96..]);
        // num_keep 0: only the tail.
        let c = cut(&text, Budget::of(8, 0));
        assert_eq!(c, &text[1000 - 128..]);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        // 3-byte characters: no cut may split one.
        let text = "é€".repeat(500);
        for bytes in 1..64 {
            for head in 0..=bytes {
                let c = cut(&text, Budget { bytes, head });
                assert!(c.len() <= bytes, "{bytes} {head}: {}", c.len());
                assert!(c.starts_with(&text[..floor_boundary(&text, head)]));
                let tail = ceil_boundary(&text, text.len() - (bytes - head));
                assert!(c.ends_with(&text[tail..]), "{bytes} {head}");
            }
        }
        // A 4 MB single word costs no more than its budget.
        let word = "a".repeat(4 << 20);
        assert_eq!(
            cut(&word, Budget::of(4096, 4)).len(),
            4096 * BYTES_PER_TOKEN
        );
    }

    #[test]
    fn fim_keeps_what_is_next_to_the_cursor() {
        let b = Budget {
            bytes: 100,
            head: 0,
        };
        let (p, s) = cut_fim("short", "end", b);
        assert_eq!((p, s), ("short", "end"));
        let prefix = "p".repeat(80) + "CURSOR";
        let suffix = "AFTER".to_string() + &"s".repeat(500);
        let (p, s) = cut_fim(&prefix, &suffix, b);
        assert!(p.ends_with("CURSOR") && s.starts_with("AFTER"), "{p} {s}");
        assert_eq!(p.len() + s.len(), 100);
        // A long prefix leaves the suffix a quarter; a short one leaves it the rest.
        assert_eq!(s.len(), 25);
        let (p, s) = cut_fim("tiny", &suffix, b);
        assert_eq!((p, s.len()), ("tiny", 96));
        let long = "p".repeat(500);
        let (p, s) = cut_fim(&long, "tail", b);
        assert_eq!((p.len(), s), (96, "tail"));
    }

    #[test]
    fn counts_and_sizes_are_capped_with_their_numbers() {
        assert!(check_messages(MAX_MESSAGES).is_ok());
        assert!(check_inputs(MAX_EMBED_INPUTS).is_ok());
        assert!(check_inputs(MAX_EMBED_INPUTS + 1).is_err());
        let e = check_messages(MAX_MESSAGES + 1).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("4097"), "{}", e.message);
        let tool = serde_json::json!({"type": "function", "function": {"name": "f"}});
        assert!(check_tools(&vec![tool.clone(); MAX_TOOLS]).is_ok());
        assert!(check_tools(&vec![tool; MAX_TOOLS + 1]).is_err());
        let big = serde_json::json!({"function": {"name": "f", "description": "d".repeat(MAX_TOOLS_BYTES)}});
        assert!(check_tools(&[big]).unwrap_err().message.contains("bytes"));
        let schema =
            serde_json::json!({"type": "object", "description": "d".repeat(MAX_SCHEMA_BYTES)});
        assert!(check_schema(&schema).is_err());
        assert!(check_schema(&serde_json::json!({"type": "object"})).is_ok());
        assert_eq!(
            json_len(&serde_json::json!({"a": [1, 2]})),
            r#"{"a":[1,2]}"#.len()
        );
    }
}
