//! The tool-call parser on arbitrary model output: the same text fed at once and in
//! arbitrary pieces (as it streams, cut anywhere) gives the same content and the same
//! calls; an answer without calls is its text, none of it lost; a call is only ever of
//! a supplied tool, with an object of arguments. The request side too: `tools` and `tool_choice`
//! JSON through `Tools::parse`, `Choice::parse` and `Plan::new`, and the plan's parser
//! on the output.
//!
//! Input, in parts separated by NUL bytes: the tool names (one a line), the output,
//! the sizes of the streamed pieces (one byte each), `tools` JSON, `tool_choice` JSON.
#![no_main]

use duet::api::tools::{split_answer, Choice, Piece, Plan, ToolParser, Tools};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

type Summary = (String, Vec<(usize, String, Value)>);

/// Content and calls (position, name and arguments; ids are random) of pieces.
fn summary(pieces: Vec<Piece>) -> Summary {
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Call(c) => calls.push((c.index, c.name, c.arguments)),
        }
    }
    (text, calls)
}

fn streamed(mut p: ToolParser, output: &str, cuts: &[u8]) -> Summary {
    let mut pieces = Vec::new();
    let mut rest = output;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() {
        let mut n = (*cuts.next().unwrap_or(&0) as usize % 16 + 1).min(rest.len());
        while !rest.is_char_boundary(n) {
            n += 1;
        }
        pieces.extend(p.push(&rest[..n]));
        rest = &rest[n..];
    }
    pieces.extend(p.finish());
    summary(pieces)
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |&b| b == 0);
    let names: Vec<String> = duet_fuzz::text(parts.next().unwrap_or_default())
        .lines()
        .filter(|n| !n.is_empty())
        .take(8)
        .map(str::to_string)
        .collect();
    let output = duet_fuzz::text(parts.next().unwrap_or_default());
    let cuts = parts.next().unwrap_or_default();
    let tools = parts.next().unwrap_or_default();
    let choice = parts.next().unwrap_or_default();

    let whole = {
        let mut p = ToolParser::new(names.clone());
        let mut pieces = p.push(&output);
        pieces.extend(p.finish());
        summary(pieces)
    };
    let pieces = streamed(ToolParser::new(names.clone()), &output, cuts);
    assert_eq!(whole, pieces, "streaming in pieces changed the answer");
    if whole.1.is_empty() {
        // No call: the answer is its text, nothing lost (whitespace before a tag that
        // might have been a call may go).
        let visible = |s: &str| s.split_whitespace().collect::<String>();
        assert_eq!(visible(&whole.0), visible(&output), "text was lost");
    }
    if names.is_empty() {
        assert!(whole.1.is_empty());
    }
    for (i, (index, name, args)) in whole.1.iter().enumerate() {
        assert_eq!(*index, i);
        assert!(
            names.contains(name),
            "a call of a tool that was not supplied"
        );
        assert!(args.is_object(), "arguments are always an object");
    }

    // What a request's tools and tool_choice make of the same output.
    let Ok(specs) = serde_json::from_slice::<Vec<Value>>(tools) else {
        return;
    };
    let Ok(tools) = Tools::parse(&specs) else {
        return;
    };
    let choice = serde_json::from_slice::<Value>(choice).ok();
    let Ok(choice) = Choice::parse(choice.as_ref(), &tools) else {
        return;
    };
    let plan = Plan::new(tools.clone(), &choice);
    if let Some(duet::model::grammar::Format::Schema(schema)) = &plan.grammar {
        assert!(schema.is_object());
    }
    let (_, calls) = split_answer(&output, plan.parser);
    for c in &calls {
        assert!(tools.names.contains(&c.name));
        assert!(c.openai()["function"]["arguments"].is_string());
        assert!(c.ollama()["function"]["arguments"].is_object());
    }
});
