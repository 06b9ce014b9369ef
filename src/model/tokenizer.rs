//! Text ⇄ token ids. The tokenizer comes from the GGUF metadata (candle's
//! `TokenizerFromGguf`), or from a `tokenizer.json` beside the model file when present.

use super::gguf::GgufFile;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot build the tokenizer of {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer failed: {0}")]
    Codec(String),
}

/// The largest char boundary of `s` at or below `at`.
pub fn floor_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The smallest char boundary of `s` at or above `at`.
pub fn ceil_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// What is kept of a `text` longer than `bytes` before it is tokenized: its first `head`
/// and its last `bytes - head` bytes, cut at character boundaries (None when it fits).
pub fn head_and_tail(text: &str, bytes: usize, head: usize) -> Option<(&str, &str)> {
    if text.len() <= bytes {
        return None;
    }
    let h = floor_boundary(text, head);
    let t = ceil_boundary(text, text.len() - (bytes - head.min(bytes)));
    Some((&text[..h], &text[t.max(h)..]))
}

/// The tokenizer plus the token ids that end a generation.
pub struct TextCodec {
    tokenizer: Tokenizer,
    stop_ids: Vec<u32>,
}

impl TextCodec {
    pub fn load(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let beside = gguf.path.with_file_name("tokenizer.json");
        let err = |message: String| TokenizerError::Load {
            path: gguf.path.display().to_string(),
            message,
        };
        let tokenizer = if beside.is_file() {
            Tokenizer::from_file(&beside).map_err(|e| err(e.to_string()))?
        } else {
            Tokenizer::from_gguf(&gguf.content).map_err(|e| err(e.to_string()))?
        };
        // Qwen ends a turn with <|im_end|> and a document with <|endoftext|>; the file's
        // eos id is one of them but both must stop generation.
        let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        if let Some(eos) = gguf
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
        {
            if !stop_ids.contains(&eos) {
                stop_ids.push(eos);
            }
        }
        if stop_ids.is_empty() {
            return Err(err("no end-of-sequence token found".into()));
        }
        Ok(Self {
            tokenizer,
            stop_ids,
        })
    }

    /// A vocabulary of `size` placeholder words ("t0", "t1", …), the last one ending a
    /// sequence: for generated weights, which have no real vocabulary.
    pub fn placeholder(size: usize) -> Result<Self, TokenizerError> {
        use tokenizers::models::wordlevel::WordLevel;
        let err = |message: String| TokenizerError::Load {
            path: "<placeholder vocabulary>".into(),
            message,
        };
        if size == 0 {
            return Err(err("empty vocabulary".into()));
        }
        let vocab = (0..size as u32).map(|i| (format!("t{i}"), i)).collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("t0".into())
            .build()
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            tokenizer: Tokenizer::new(model),
            stop_ids: vec![size as u32 - 1],
        })
    }

    /// Encodes text; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The bytes a token stands for: byte-level BPE undone; an added token's text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        static MAP: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
            std::sync::OnceLock::new();
        let map = MAP.get_or_init(byte_level_map);
        match self.tokenizer.id_to_token(id) {
            Some(t) => t
                .chars()
                .map(|c| map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| t.into_bytes()),
            None => Vec::new(),
        }
    }
}

/// GPT-2's byte-level alphabet: the printable character each byte is written as.
pub fn byte_level_map() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        let printable = matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}');
        if printable {
            map.insert(c, b);
        } else {
            map.insert(char::from_u32(next).unwrap_or(c), b);
            next += 1;
        }
    }
    map
}

/// Turns a stream of token ids into text pieces, holding back bytes of a character that
/// spans several tokens until it is complete (byte-level BPE splits UTF-8 sequences).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = codec.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            let piece = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, codec: &TextCodec) -> Result<String, TokenizerError> {
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = codec.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
