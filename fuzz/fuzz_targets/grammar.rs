//! Structured output (the JSON output side): any `format` a request can send, compiled
//! into a grammar over the real vocabulary; when it compiles, a generation is walked
//! through it with tokens the input picks among those the mask allows. An answer the
//! grammar calls complete must parse as JSON: that is what `format` promises clients.
#![no_main]

use duet::model::grammar::{Format, Grammars};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| {
        let codec = duet_fuzz::codec();
        Grammars::new(codec, codec.vocab_size()).expect("the grammar engine builds")
    })
}

fuzz_target!(|data: &[u8]| {
    // The format as JSON text, then (after a NUL) the bytes that pick the tokens.
    let (format, picks) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(format) else {
        return;
    };
    let Ok(Some(format)) = Format::from_ollama(Some(&value)) else {
        return;
    };
    let Ok(mut constraint) = grammars().constraint(&format) else {
        return;
    };
    let codec = duet_fuzz::codec();
    let vocab = codec.vocab_size();
    let mut logits = vec![0f32; vocab];
    let mut answer: Vec<u32> = Vec::new();
    let mut complete = false;
    for &pick in picks.iter().take(48) {
        logits.fill(0.0);
        if constraint.mask(&mut logits).is_err() {
            return;
        }
        // The first allowed token from a place the input picks.
        let start = (pick as usize).wrapping_mul(0x9E37_79B9) % vocab;
        let Some(token) = (start..vocab)
            .chain(0..start)
            .find(|&t| logits[t].is_finite())
            .map(|t| t as u32)
        else {
            panic!("the grammar allows nothing next");
        };
        if codec.is_stop(token) {
            complete = true;
            break;
        }
        answer.push(token);
        match constraint.accept(token) {
            Ok(true) => {
                complete = true;
                break;
            }
            Ok(false) => {}
            Err(e) => panic!("an allowed token was refused: {e}"),
        }
    }
    if complete {
        let text = codec.decode(&answer).expect("allowed tokens decode");
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
            panic!("a complete answer is not JSON ({e}): {text:?}");
        }
    }
});
