//! Structured output by constrained decoding: at every step the tokens that cannot
//! continue a valid answer are masked out of the logits, so the output always parses
//! (`format: "json"`) and validates against the schema (`format: {schema}`).
//!
//! The grammar engine is llguidance (the Rust engine llama.cpp and vLLM use): it
//! compiles a JSON schema into a grammar and computes each step's token mask over the
//! model's vocabulary, which it sees as byte strings in a trie ([`Vocabulary`]).

use super::tokenizer::TextCodec;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What a request asks its answer to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Any JSON object (Ollama's `format: "json"`, OpenAI's `json_object`).
    Json,
    /// JSON valid against this schema.
    Schema(Value),
}

impl Format {
    /// Ollama's `format`: absent, `""`, `"json"`, or a JSON schema object.
    pub fn from_ollama(v: Option<&Value>) -> Result<Option<Self>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) if s == "json" => Ok(Some(Format::Json)),
            Some(Value::String(s)) => Err(format!(
                "format '{s}' is not \"json\" or a JSON schema object"
            )),
            Some(Value::Object(_)) => Ok(Some(Format::Schema(v.cloned().unwrap_or_default()))),
            Some(_) => Err("format must be \"json\" or a JSON schema object".into()),
        }
    }

    /// The schema the grammar is compiled from, with the whitespace it allows between
    /// tokens bounded (unbounded, a model can pad forever with newlines).
    fn schema(&self) -> Value {
        let mut schema = match self {
            Format::Json => json!({"type": "object"}),
            Format::Schema(s) => s.clone(),
        };
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert(json!({
                "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}",
                "lenient": true,
            }));
        }
        schema
    }
}

/// A model's vocabulary as llguidance sees it: each token's bytes (byte-level BPE
/// undone), special tokens marked, and the tokens that end a generation.
pub struct Vocabulary {
    trie: TokTrie,
    codec_ids: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.codec_ids
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

impl Vocabulary {
    /// The vocabulary of `codec`, over `n_vocab` logits (a model may have more output
    /// rows than tokens; those rows are never allowed).
    pub fn new(codec: &TextCodec, n_vocab: usize) -> Result<Self, String> {
        let tok = codec.inner();
        let size = tok.get_vocab_size(true).max(n_vocab);
        let specials: std::collections::HashSet<u32> = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special || (t.content.starts_with('<') && t.content.ends_with('>')))
            .map(|(id, _)| id)
            .collect();
        let map = super::tokenizer::byte_level_map();
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let word = match tok.id_to_token(id) {
                Some(t) if specials.contains(&id) => {
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(t.as_bytes());
                    b
                }
                Some(t) => match t
                    .chars()
                    .map(|c| map.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                {
                    Some(bytes) => bytes,
                    // Not byte-level (an added plain token): its text as it is.
                    None => t.into_bytes(),
                },
                None => {
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(format!("<[{id}]>").as_bytes());
                    b
                }
            };
            words.push(word);
        }
        let stops = codec.stop_ids();
        let Some(&eos) = stops.first() else {
            return Err("the vocabulary has no end-of-sequence token".into());
        };
        let info = TokRxInfo::new(size as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if stops.len() > 1 {
            trie = trie.with_eos_tokens(stops);
        }
        Ok(Self {
            trie,
            codec_ids: Arc::new(tok.clone()),
        })
    }
}

/// Compiles grammars for one model's vocabulary (built once per model: the trie of its
/// 152k tokens takes a moment).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(codec: &TextCodec, n_vocab: usize) -> Result<Self, String> {
        let env: TokEnv = Arc::new(Vocabulary::new(codec, n_vocab)?);
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Quiet: grammar warnings go to the request's error, not stderr.
        factory.set_stderr_log_level(0);
        Ok(Self { factory })
    }

    /// The constraint of `format` for one generation; an invalid or unsupported schema
    /// is an error for the client.
    pub fn constraint(&self, format: &Format) -> Result<Constraint, String> {
        let grammar = TopLevelGrammar::from_json_schema(format.schema());
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| format!("invalid JSON schema: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(format!("invalid JSON schema: {e}"));
        }
        Ok(Constraint { matcher })
    }
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow next to -inf (the
    /// end-of-sequence tokens are allowed once the answer is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        // A word of the mask at a time: most are all-allowed or all-refused.
        let words = allowed.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX if chunk.len() == 32 => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if bits >> b & 1 == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Advances past the token sampled; true when the answer is complete and nothing
    /// but the end can follow.
    pub fn accept(&mut self, token: u32) -> Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}
