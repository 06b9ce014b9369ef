//! The chat templates duet renders (the real models' and ChatML) with hostile
//! conversations: a chat request's `messages` and `tools` (any roles and contents:
//! template syntax, control characters, special tokens; tool calls and tools as any
//! JSON), taken through the checks the API applies (`Tools::parse`, `history_calls`)
//! before rendering. Also an arbitrary template (a GGUF's `tokenizer.chat_template`
//! comes from the file) on a fixed conversation.
//!
//! Input: a byte that picks the template (255: the rest is a template's source), then
//! a chat request's JSON body.
#![no_main]

use duet::api::tools::{history_calls, Tools};
use duet::model::template::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Turn {
    role: String,
    content: Option<String>,
    tool_calls: Option<Vec<Value>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Chat {
    messages: Vec<Turn>,
    tools: Option<Vec<Value>>,
    add_generation_prompt: Option<bool>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick == 255 {
        if let Ok(t) = ChatTemplate::new(&duet_fuzz::text(rest)) {
            let _ = t.render(
                &[Message::new("system", "s"), Message::new("user", "hi")],
                true,
            );
        }
        return;
    }
    let templates = duet_fuzz::templates();
    let t = &templates[pick as usize % templates.len()];
    let Ok(chat) = serde_json::from_slice::<Chat>(rest) else {
        return;
    };
    let mut messages = Vec::new();
    for turn in &chat.messages {
        let mut m = Message::new(&turn.role, turn.content.as_deref().unwrap_or_default());
        if let Some(calls) = turn.tool_calls.as_deref().filter(|c| !c.is_empty()) {
            match history_calls(calls) {
                Ok(c) => m.tool_calls = Some(c),
                Err(_) => return,
            }
        }
        messages.push(m);
    }
    let tools = match chat.tools.as_deref().map(Tools::parse) {
        Some(Ok(t)) if !t.is_empty() => Some(t.specs),
        Some(Err(_)) => return,
        _ => None,
    };
    let add = chat.add_generation_prompt.unwrap_or(true);
    let Ok(text) = t.render_with_tools(&messages, tools.as_deref(), add) else {
        return;
    };
    // The templates print what users wrote as it is.
    for m in &messages {
        if m.role == "user" {
            assert!(text.contains(&m.content), "a user's text was not rendered");
        }
    }
});
