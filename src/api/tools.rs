//! Tool calls: the tools a request supplies, and the calls found in the model's output
//! as it streams.
//!
//! Qwen2.5's template asks for `<tool_call>{"name": …, "arguments": …}</tool_call>`;
//! Qwen2.5-Coder often answers with the bare JSON object instead (or in a ```json
//! fence), which Ollama leaves in the content (ollama#12174). Both become calls here,
//! but only for the names of the tools supplied: anything else stays text. Text before
//! a call streams as content as it comes; only what might be the start of a call is
//! held back until it is clear.

use super::stream::Item;
use super::ApiError;
use crate::model::grammar::Format;
use crate::serving::Summary;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;

/// The tools of a request: each as the client sent it (for the chat template), and
/// their names.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    pub specs: Vec<Value>,
    pub names: Vec<String>,
}

impl Tools {
    /// Checks Ollama's / OpenAI's tool objects: `{"type": "function", "function":
    /// {"name", "description", "parameters"}}`. A missing `type` is taken as a function.
    pub fn parse(tools: &[Value]) -> Result<Self, ApiError> {
        super::limits::check_tools(tools)?;
        let mut out = Tools::default();
        for (i, t) in tools.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
            if kind != "function" {
                return Err(ApiError::bad_request(format!(
                    "tools[{i}]: type '{kind}' is not supported (only \"function\")"
                )));
            }
            let Some(f) = t.get("function").and_then(Value::as_object) else {
                return Err(ApiError::bad_request(format!(
                    "tools[{i}] has no function object"
                )));
            };
            let Some(name) = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            else {
                return Err(ApiError::bad_request(format!(
                    "tools[{i}].function has no name"
                )));
            };
            out.names.push(name.to_string());
            let mut spec = t.clone();
            if let Some(o) = spec.as_object_mut() {
                o.insert("type".into(), json!("function"));
            }
            out.specs.push(spec);
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Which calls a request allows (OpenAI's `tool_choice`; Ollama's requests are `Auto`).
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model decides.
    Auto,
    /// No calls: the tools are not shown to the model.
    Never,
    /// At least one call, to a tool the model picks.
    Required,
    /// A call to this tool.
    Named(String),
}

impl Choice {
    /// OpenAI's `tool_choice`: "auto", "none", "required", or `{"type": "function",
    /// "function": {"name"}}`.
    pub fn parse(v: Option<&Value>, tools: &Tools) -> Result<Self, ApiError> {
        let choice = match v {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Choice::Auto,
                "none" => Choice::Never,
                "required" | "any" => Choice::Required,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "tool_choice '{other}' is not one of auto, none, required"
                    )))
                }
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) => Choice::Named(name.to_string()),
                None => return Err(ApiError::bad_request("tool_choice names no function")),
            },
        };
        match &choice {
            Choice::Required | Choice::Named(_) if tools.is_empty() => Err(ApiError::bad_request(
                "tool_choice asks for a call but no tools are given",
            )),
            Choice::Named(n) if !tools.names.contains(n) => Err(ApiError::bad_request(format!(
                "tool_choice names '{n}', which is not among the tools"
            ))),
            _ => Ok(choice),
        }
    }
}

/// The template's tools, the text that opens the answer, the parser for the answer, and
/// the grammar it must follow, for a request's tools and choice.
pub struct Plan {
    /// For the chat template (`None`: no tools shown).
    pub specs: Option<Vec<Value>>,
    /// Appended to the rendered prompt.
    pub opening: String,
    pub parser: Option<ToolParser>,
    /// For `required` and a named function: the answer is a call object of one of the
    /// tools (its name, and arguments valid against its parameters), by constrained
    /// decoding after an opened `<tool_call>`.
    pub grammar: Option<Format>,
}

impl Plan {
    pub fn new(tools: Tools, choice: &Choice) -> Self {
        if tools.is_empty() || *choice == Choice::Never {
            return Plan {
                specs: None,
                opening: String::new(),
                parser: None,
                grammar: None,
            };
        }
        let allowed: Vec<usize> = match choice {
            Choice::Required => (0..tools.names.len()).collect(),
            Choice::Named(n) => tools
                .names
                .iter()
                .position(|t| t == n)
                .into_iter()
                .collect(),
            _ => {
                return Plan {
                    opening: String::new(),
                    parser: Some(ToolParser::new(tools.names.clone())),
                    specs: Some(tools.specs),
                    grammar: None,
                }
            }
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|&i| {
                let params = tools.specs[i]
                    .pointer("/function/parameters")
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"}));
                json!({"type": "object",
                       "properties": {"name": {"const": tools.names[i]}, "arguments": params},
                       "required": ["name", "arguments"], "additionalProperties": false})
            })
            .collect();
        let schema = if calls.len() == 1 {
            calls.into_iter().next().unwrap_or_default()
        } else {
            json!({"anyOf": calls})
        };
        Plan {
            opening: format!("{OPEN}\n"),
            parser: Some(ToolParser::inside_call(tools.names.clone(), "\n")),
            specs: Some(tools.specs),
            grammar: Some(Format::Schema(schema)),
        }
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// "call_…", unique enough for clients to pair results with calls.
    pub id: String,
    /// Position among this answer's calls.
    pub index: usize,
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

impl ToolCall {
    /// Ollama's shape: `{"id", "function": {"index", "name", "arguments": {…}}}`.
    pub fn ollama(&self) -> Value {
        json!({"id": self.id, "function": {"index": self.index, "name": self.name, "arguments": self.arguments}})
    }

    /// OpenAI's shape: arguments as a JSON string.
    pub fn openai(&self) -> Value {
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments.to_string()}})
    }
}

fn call_id() -> String {
    const ABC: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..12)
        .map(|_| ABC[rand::random::<u32>() as usize % ABC.len()] as char)
        .collect();
    format!("call_{tail}")
}

/// What the parser hands on, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// A bare JSON call longer than this is taken for text.
const MAX_BARE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Ordinary text; `fresh` while nothing but whitespace has come since the start or
    /// the last call (a bare JSON call may begin only there).
    Text { fresh: bool },
    /// Inside `<tool_call>`, waiting for `</tool_call>`.
    Tag,
    /// A `{` (or a ```json fence) at a fresh start: maybe a bare call.
    Bare,
}

/// Finds tool calls in streamed text.
pub struct ToolParser {
    names: Vec<String>,
    state: State,
    /// Text held back: the inside of a tag, a possible bare call, or what might begin
    /// `<tool_call>` or a bare call.
    buf: String,
    calls: usize,
}

impl ToolParser {
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            state: State::Text { fresh: true },
            buf: String::new(),
            calls: 0,
        }
    }

    /// A parser for a generation whose prompt already ends inside a call (`prefix`: the
    /// text of the call the prompt started, after `<tool_call>`).
    pub fn inside_call(names: Vec<String>, prefix: &str) -> Self {
        let mut p = Self::new(names);
        p.state = State::Tag;
        p.buf.push_str(prefix);
        p
    }

    /// How many calls were found so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds the next piece of output.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.drain(&mut out, false);
        merge_text(out)
    }

    /// The output ended: whatever is held back is resolved.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.drain(&mut out, true);
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            // An opened tag is given back even with nothing after it.
            State::Tag => match self.call_from(&rest) {
                Some(c) => out.push(Piece::Call(c)),
                None => out.push(Piece::Text(format!("{OPEN}{rest}"))),
            },
            _ if rest.is_empty() => {}
            State::Bare => match self.bare_call(&rest) {
                Some(c) => out.push(Piece::Call(c)),
                None => out.push(Piece::Text(rest)),
            },
            State::Text { .. } => out.push(Piece::Text(rest)),
        }
        merge_text(out)
    }

    fn drain(&mut self, out: &mut Vec<Piece>, end: bool) {
        loop {
            match self.state {
                State::Text { fresh: true } => {
                    let rest = self.buf.trim_start();
                    if rest.is_empty() {
                        if !end {
                            return; // only whitespace so far: wait
                        }
                        if self.calls > 0 {
                            self.buf.clear(); // whitespace after the calls
                            return;
                        }
                        self.state = State::Text { fresh: false };
                        continue;
                    }
                    let bare = if self.names.is_empty() {
                        Some(false)
                    } else if rest.starts_with('{') {
                        Some(true)
                    } else {
                        match fence_then_brace(rest) {
                            Fence::Yes(_) => Some(true),
                            Fence::Maybe if !end => None,
                            _ => Some(false),
                        }
                    };
                    let (tag, maybe_tag) = (rest.starts_with(OPEN), OPEN.starts_with(rest));
                    let lead = self.buf.len() - rest.len();
                    match bare {
                        None => return,
                        Some(true) => self.state = State::Bare,
                        Some(false) => {
                            if tag {
                                // Whitespace before a call is not content.
                                self.buf.drain(..lead);
                            } else if maybe_tag && !end {
                                return; // it may still become a tag: wait
                            }
                            self.state = State::Text { fresh: false };
                        }
                    }
                }
                State::Text { fresh: false } => {
                    if let Some(at) = self.buf.find(OPEN) {
                        let before: String = self.buf.drain(..at).collect();
                        self.buf.drain(..OPEN.len());
                        if !before.is_empty() {
                            out.push(Piece::Text(before));
                        }
                        self.state = State::Tag;
                        continue;
                    }
                    // Hold back what might be the start of the tag.
                    let keep = if end {
                        0
                    } else {
                        partial_suffix(&self.buf, OPEN)
                    };
                    let emit = self.buf.len() - keep;
                    if emit > 0 {
                        let text: String = self.buf.drain(..emit).collect();
                        out.push(Piece::Text(text));
                    }
                    return;
                }
                State::Tag => {
                    let Some(at) = self.buf.find(CLOSE) else {
                        return;
                    };
                    let inner: String = self.buf.drain(..at).collect();
                    self.buf.drain(..CLOSE.len());
                    match self.call_from(&inner) {
                        Some(c) => out.push(Piece::Call(c)),
                        None => out.push(Piece::Text(format!("{OPEN}{inner}{CLOSE}"))),
                    }
                    self.state = State::Text { fresh: true };
                }
                State::Bare => {
                    let lead = self.buf.len() - self.buf.trim_start().len();
                    let rest = &self.buf[lead..];
                    let (skip, fenced) = match fence_then_brace(rest) {
                        Fence::Yes(skip) => (skip, true),
                        _ => (0, false),
                    };
                    let body = &rest[skip..];
                    let doubled = body.starts_with("{{");
                    let Some(len) = json_object_end(body) else {
                        if end && doubled {
                            // Unbalanced doubled braces: the last chance is the whole.
                            let whole = self.buf.clone();
                            if let Some(c) = self.bare_call(&whole) {
                                self.buf.clear();
                                out.push(Piece::Call(c));
                                self.state = State::Text { fresh: true };
                                continue;
                            }
                        }
                        if self.buf.len() > MAX_BARE
                            || end
                            || !self.buf.trim_start().starts_with(['{', '`'])
                        {
                            self.state = State::Text { fresh: false };
                            continue;
                        }
                        return;
                    };
                    let start = lead + skip;
                    let mut consumed = start + len;
                    let json_text = self.buf[start..consumed].to_string();
                    if fenced {
                        // The closing fence, once it has come.
                        let after = &self.buf[consumed..];
                        let trimmed = after.trim_start();
                        if trimmed.starts_with("```") {
                            consumed += after.len() - trimmed.len() + 3;
                        } else if !end && "```".starts_with(trimmed) {
                            return;
                        }
                    }
                    match self.call_from(&json_text) {
                        Some(c) => {
                            self.buf.drain(..consumed);
                            out.push(Piece::Call(c));
                            self.state = State::Text { fresh: true };
                        }
                        None => self.state = State::Text { fresh: false },
                    }
                }
            }
        }
    }

    /// The call in a tag's JSON (`{"name", "arguments"}`), if it names a supplied tool.
    fn call_from(&mut self, inner: &str) -> Option<ToolCall> {
        let t = inner.trim();
        let v: Value = serde_json::from_str(t).ok().or_else(|| {
            // The 1.5B's template shows the call format with doubled braces, and
            // the model sometimes copies them: `{{"name": …}}`, or only the
            // opening pair.
            let t = t.strip_prefix('{')?;
            serde_json::from_str(t)
                .ok()
                .or_else(|| serde_json::from_str(t.strip_suffix('}')?).ok())
        })?;
        self.make_call(v)
    }

    fn bare_call(&mut self, text: &str) -> Option<ToolCall> {
        let text = text.trim_start();
        let body = match fence_then_brace(text) {
            Fence::Yes(skip) => &text[skip..],
            _ => text,
        };
        match json_object_end(body) {
            Some(end) => self.call_from(&body[..end]),
            None if body.starts_with("{{") => {
                self.call_from(body.trim_end().trim_end_matches("```"))
            }
            None => None,
        }
    }

    fn make_call(&mut self, v: Value) -> Option<ToolCall> {
        let o = v.as_object()?;
        let name = o.get("name").and_then(Value::as_str)?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let arguments = match o.get("arguments").or_else(|| o.get("parameters")) {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::Object(m)) => Value::Object(m.clone()),
            // Arguments given as a JSON string.
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => Value::Object(m),
                _ => return None,
            },
            Some(_) => return None,
        };
        let call = ToolCall {
            id: call_id(),
            index: self.calls,
            name: name.to_string(),
            arguments,
        };
        self.calls += 1;
        Some(call)
    }
}

/// A chat answer's stream once tool calls are picked out of its text.
pub enum ChatItem {
    /// Text, and the log probabilities of the tokens behind it (when asked for).
    Text(String, Vec<crate::serving::Logprob>),
    Call(ToolCall),
    Done(Summary),
    Error(String),
}

/// `items` with the calls `parser` finds (no parser: the text as it is).
pub fn chat_items(
    items: impl Stream<Item = Item> + Send + 'static,
    parser: Option<ToolParser>,
) -> impl Stream<Item = ChatItem> + Send {
    let items = Box::pin(items);
    let pending: VecDeque<ChatItem> = VecDeque::new();
    // Log probabilities wait for the next text piece the parser lets through.
    let held: Vec<crate::serving::Logprob> = Vec::new();
    futures_util::stream::unfold(
        (items, parser, pending, held, false),
        |(mut items, mut parser, mut pending, mut held, mut ended)| async move {
            loop {
                if let Some(next) = pending.pop_front() {
                    return Some((next, (items, parser, pending, held, ended)));
                }
                if ended {
                    return None;
                }
                let mut pieces = |p: Vec<Piece>, held: &mut Vec<crate::serving::Logprob>| {
                    for p in p {
                        pending.push_back(match p {
                            Piece::Text(t) => ChatItem::Text(t, std::mem::take(held)),
                            Piece::Call(c) => ChatItem::Call(c),
                        })
                    }
                };
                match items.next().await {
                    Some(Item::Text(t, l)) => {
                        held.extend(l);
                        match parser.as_mut() {
                            Some(p) => pieces(p.push(&t), &mut held),
                            None => pieces(vec![Piece::Text(t)], &mut held),
                        }
                    }
                    Some(Item::Done(s)) => {
                        if let Some(p) = parser.as_mut() {
                            pieces(p.finish(), &mut held);
                        }
                        pending.push_back(ChatItem::Done(s));
                        ended = true;
                    }
                    Some(Item::Error(e)) => {
                        pending.push_back(ChatItem::Error(e));
                        ended = true;
                    }
                    None => ended = true,
                }
            }
        },
    )
}

/// A whole answer's text split into its content and its calls.
pub fn split_answer(text: &str, parser: Option<ToolParser>) -> (String, Vec<ToolCall>) {
    let Some(mut p) = parser else {
        return (text.to_string(), Vec::new());
    };
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    if !calls.is_empty() && content.trim().is_empty() {
        content.clear();
    }
    (content, calls)
}

/// A history message's `tool_calls` as the chat template reads them: `{"function":
/// {"name", "arguments": {…}}}`, arguments given as a JSON string (OpenAI's way) parsed.
pub fn history_calls(calls: &[Value]) -> Result<Vec<Value>, ApiError> {
    calls
        .iter()
        .map(|c| {
            let f = c.get("function").unwrap_or(c);
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad_request("a tool call in the messages has no function name")
            })?;
            let arguments = match f.get("arguments") {
                None | Some(Value::Null) => json!({}),
                Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
                Some(v) => v.clone(),
            };
            Ok(json!({"function": {"name": name, "arguments": arguments}}))
        })
        .collect()
}

/// Adjacent text pieces as one; empty ones dropped.
fn merge_text(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match (out.last_mut(), p) {
            (_, Piece::Text(t)) if t.is_empty() => {}
            (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, p) => out.push(p),
        }
    }
    out
}

/// The length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

#[derive(Debug, PartialEq)]
enum Fence {
    /// A fence (```json or ```) and then `{` at this offset.
    Yes(usize),
    /// Could still become one.
    Maybe,
    Not,
}

/// Whether `s` opens with a code fence whose content starts with `{`.
fn fence_then_brace(s: &str) -> Fence {
    if s.len() < 3 {
        return if "```".starts_with(s) {
            Fence::Maybe
        } else {
            Fence::Not
        };
    }
    let Some(rest) = s.strip_prefix("```") else {
        return Fence::Not;
    };
    let lang_end = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let lang = &rest[..lang_end];
    if !lang.is_empty() && !"json".starts_with(&lang.to_ascii_lowercase()) {
        return Fence::Not;
    }
    let after = &rest[lang_end..];
    let body = after.trim_start();
    if body.is_empty() {
        return Fence::Maybe;
    }
    if lang.len() < 4 && !lang.is_empty() && lang_end == rest.len() {
        return Fence::Maybe;
    }
    if body.starts_with('{') {
        Fence::Yes(s.len() - body.len())
    } else {
        Fence::Not
    }
}

/// Where the JSON object at the start of `s` ends (bytes), if it is complete: braces
/// counted outside strings.
fn json_object_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            c if i == 0 && c != '{' => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "read_file".into()]
    }

    /// The pieces of `text` fed in chunks of `n` bytes (on char boundaries).
    fn run(text: &str, n: usize) -> Vec<Piece> {
        let mut p = ToolParser::new(names());
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = n.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            out.extend(p.push(&rest[..cut]));
            rest = &rest[cut..];
        }
        out.extend(p.finish());
        merge_text(out)
    }

    fn calls(pieces: &[Piece]) -> Vec<(String, Value)> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Call(c) => Some((c.name.clone(), c.arguments.clone())),
                _ => None,
            })
            .collect()
    }

    fn text(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn tagged_calls_in_any_chunking() {
        let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a}b.rs\"}}\n</tool_call>";
        for n in [1, 2, 3, 7, 1000] {
            let p = run(out, n);
            assert_eq!(
                calls(&p),
                vec![
                    ("get_weather".into(), json!({"city": "Paris"})),
                    ("read_file".into(), json!({"path": "a}b.rs"}))
                ],
                "chunks of {n}"
            );
            assert_eq!(text(&p).trim(), "", "chunks of {n}");
        }
    }

    #[test]
    fn text_before_a_call_streams_first() {
        let mut p = ToolParser::new(names());
        assert_eq!(
            p.push("Let me check. "),
            vec![Piece::Text("Let me check. ".into())]
        );
        // A possible tag start is held back, then released when it is not one.
        assert_eq!(p.push("<tool"), vec![]);
        let got = p.push("_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>");
        assert!(matches!(&got[..], [Piece::Call(c)] if c.name == "get_weather" && c.index == 0));
        assert_eq!(p.push(" a < b"), vec![Piece::Text(" a < b".into())]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn bare_json_and_fenced_json_are_calls_for_supplied_names_only() {
        for out in [
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
            "  \n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```",
            "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            "{{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}}",
            "{{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
        ] {
            for n in [1, 4, 1000] {
                let p = run(out, n);
                assert_eq!(
                    calls(&p),
                    vec![("get_weather".into(), json!({"city": "Oslo"}))],
                    "{out:?} / {n}"
                );
                assert_eq!(text(&p).trim(), "", "{out:?} / {n}");
            }
        }
        // Not a supplied tool, not a call shape, or JSON that does not start the answer.
        for out in [
            "{\"name\": \"rm_rf\", \"arguments\": {}}",
            "{\"city\": \"Oslo\"}",
            "Here: {\"name\": \"get_weather\", \"arguments\": {}}",
            "```python\nprint({1: 2})\n```",
            "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
            "{ unbalanced",
        ] {
            for n in [1, 3, 1000] {
                let p = run(out, n);
                assert!(calls(&p).is_empty(), "{out:?} / {n}");
                assert_eq!(text(&p), out, "{out:?} / {n}");
            }
        }
    }

    /// Found by fuzzing (fuzz/regressions/tool_calls): an answer that ended right after
    /// `<tool_call>` lost the tag, in whatever pieces it came.
    #[test]
    fn an_answer_ending_in_an_open_tag_keeps_it() {
        for out in ["<tool_call>", "text <tool_call>", "<tool_call>\n"] {
            for n in [1, 3, 1000] {
                let p = run(out, n);
                assert!(calls(&p).is_empty(), "{out:?} / {n}");
                assert_eq!(text(&p), out, "{out:?} / {n}");
            }
            let mut p = ToolParser::new(Vec::new());
            let mut got = p.push(out);
            got.extend(p.finish());
            assert_eq!(text(&got), out);
        }
    }

    /// Found by fuzzing (fuzz/regressions/tool_calls): whitespace just before a tag
    /// was dropped when a piece began with it, and kept when it came with the text
    /// before, so the streamed answer differed from the whole one.
    #[test]
    fn whitespace_before_a_tag_does_not_depend_on_the_pieces() {
        let whole = |out: &str| {
            let mut p = ToolParser::new(names());
            let mut got = p.push(out);
            got.extend(p.finish());
            (text(&got), calls(&got))
        };
        for out in [
            "Let me check. <tool_call>{\"name\": \"nope\"}</tool_call>",
            "Let me check.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>",
            "  <tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call> \n",
            "a <tool",
        ] {
            let want = whole(out);
            for n in 1..=out.len() {
                let p = run(out, n);
                assert_eq!((text(&p), calls(&p)), want, "{out:?} / {n}");
            }
        }
        // A call at the start: the whitespace before it is not content.
        let (content, calls) = whole("\n <tool_call>{\"name\": \"read_file\"}</tool_call>");
        assert_eq!((content.as_str(), calls.len()), ("", 1));
    }

    #[test]
    fn without_tools_nothing_is_parsed() {
        let mut p = ToolParser::new(Vec::new());
        let out = "{\"name\": \"get_weather\", \"arguments\": {}}";
        let mut got = p.push(out);
        got.extend(p.finish());
        assert_eq!(got, vec![Piece::Text(out.into())]);
    }

    #[test]
    fn a_prompt_that_opened_the_call() {
        let mut p = ToolParser::inside_call(names(), "\n{\"name\": \"read_file\", \"arguments\": ");
        let mut got = p.push("{\"path\": \"x\"}}\n</tool_call>");
        got.extend(p.finish());
        assert_eq!(
            calls(&got),
            vec![("read_file".into(), json!({"path": "x"}))]
        );
    }

    #[test]
    fn required_and_named_choices_open_the_call_under_a_grammar() {
        let tools = Tools::parse(&[
            json!({"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}),
            json!({"type": "function", "function": {"name": "ls"}}),
        ])
        .unwrap();
        let named = Choice::parse(
            Some(&json!({"type": "function", "function": {"name": "read_file"}})),
            &tools,
        )
        .unwrap();
        let plan = Plan::new(tools.clone(), &named);
        assert_eq!(plan.opening, "<tool_call>\n");
        let Some(Format::Schema(schema)) = &plan.grammar else {
            panic!("no grammar")
        };
        assert_eq!(schema["properties"]["name"]["const"], "read_file");
        assert_eq!(
            schema["properties"]["arguments"]["properties"]["path"]["type"],
            "string"
        );
        let (content, calls) = split_answer(
            "{\"name\": \"read_file\", \"arguments\": {\"path\": \"a\"}}",
            plan.parser,
        );
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].arguments, json!({"path": "a"}));
        let plan = Plan::new(tools.clone(), &Choice::Required);
        let Some(Format::Schema(schema)) = &plan.grammar else {
            panic!("no grammar")
        };
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(
            schema["anyOf"][1]["properties"]["arguments"],
            json!({"type": "object"})
        );
        assert!(Plan::new(tools.clone(), &Choice::Auto).grammar.is_none());
        assert!(Choice::parse(Some(&json!("required")), &Tools::default()).is_err());
        assert!(Choice::parse(Some(&json!({"function": {"name": "x"}})), &tools).is_err());
        assert_eq!(
            Choice::parse(Some(&json!("none")), &tools).unwrap(),
            Choice::Never
        );
        assert!(Plan::new(tools, &Choice::Never).parser.is_none());
    }

    #[test]
    fn tools_are_checked() {
        assert!(Tools::parse(&[json!({"type": "function", "function": {"name": "f"}})]).is_ok());
        assert!(Tools::parse(&[json!({"function": {"name": "f"}})]).is_ok());
        for bad in [
            json!({"type": "retrieval"}),
            json!({"type": "function"}),
            json!({"function": {}}),
        ] {
            assert!(Tools::parse(std::slice::from_ref(&bad)).is_err(), "{bad}");
        }
    }
}
