//! The real tokenizer (Qwen2.5-Coder's byte-level BPE, built from the GGUF) on any text
//! and any token ids: text comes back from its tokens as it went in (as the tokenizer
//! normalises it), the streaming decoder's pieces add up to the whole decode, and ids
//! outside the vocabulary are an error or nothing, never a panic.
#![no_main]

use duet::model::tokenizer::StreamDecoder;
use libfuzzer_sys::fuzz_target;
use tokenizers::{NormalizedString, Normalizer};

fuzz_target!(|data: &[u8]| {
    let codec = duet_fuzz::codec();
    let text = duet_fuzz::text(data);
    let ids = codec.encode(&text).expect("any text encodes");
    assert!(ids.len() <= text.len().max(1) * 4, "{} tokens", ids.len());
    let back = codec.decode(&ids).expect("its own tokens decode");
    // The tokenizer normalises (NFC, with its own Unicode tables) the text between
    // special tokens, which it takes out first: compare where there are none.
    if !text.contains("<|") {
        let mut normalized = NormalizedString::from(text.as_str());
        if let Some(n) = codec.inner().get_normalizer() {
            n.normalize(&mut normalized).expect("normalise");
        }
        assert_eq!(back, normalized.get(), "text did not survive its tokens");
    }
    // Streamed, token by token, as answers are.
    let mut stream = StreamDecoder::default();
    let mut pieces = String::new();
    for &id in &ids {
        pieces.push_str(&stream.push(codec, id).expect("a piece"));
    }
    pieces.push_str(&stream.flush(codec).expect("the rest"));
    assert_eq!(pieces, back, "the streamed pieces differ from the decode");
    // The input's first kilobyte as ids (any values, in the vocabulary or not).
    let raw: Vec<u32> = data
        .chunks_exact(4)
        .take(256)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % (codec.vocab_size() as u32 + 64))
        .collect();
    let _ = codec.decode(&raw);
    let mut stream = StreamDecoder::default();
    for &id in &raw {
        let _ = stream.push(codec, id);
        let _ = codec.token_bytes(id);
    }
    let _ = stream.flush(codec);
});
