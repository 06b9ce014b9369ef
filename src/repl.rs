//! `duet run MODEL` on a terminal: an interactive chat as `ollama run` has it. The
//! conversation is kept for the session; `"""` opens and closes a multi-line message;
//! `/bye` (or end of input) leaves, `/clear` forgets the conversation. It talks to a
//! running server when one answers at OLLAMA_HOST, else loads the model in-process.

use crate::client::Client;
use crate::model::{Message, Model};
use crate::serving::Options;
use anyhow::Result;
use serde_json::{json, Value};
use std::io::{BufRead, Write};

/// Where the answers come from.
pub enum Backend {
    /// A running server, and the options to send it.
    Remote { client: Client, options: Value },
    /// The model loaded in this process.
    Local { model: Box<Model>, options: Options },
}

const HELP: &str = "Available Commands:
  /clear          Clear the conversation so far
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin and end a multi-line message.";

/// One message read from the user, or the end.
enum Input {
    Message(String),
    Command(String),
    End,
}

fn read_input(input: &mut impl BufRead, out: &mut impl Write) -> Result<Input> {
    write!(out, ">>> ")?;
    out.flush()?;
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(Input::End);
    }
    let trimmed = line.trim_end_matches(['\n', '\r']);
    if let Some(rest) = trimmed.trim_start().strip_prefix("\"\"\"") {
        // Multi-line: up to a line that ends with """ (possibly this one).
        if let Some(body) = rest.strip_suffix("\"\"\"") {
            return Ok(Input::Message(body.to_string()));
        }
        let mut text = rest.to_string();
        loop {
            write!(out, "... ")?;
            out.flush()?;
            let mut next = String::new();
            if input.read_line(&mut next)? == 0 {
                return Ok(Input::Message(text));
            }
            let next = next.trim_end_matches(['\n', '\r']);
            if !text.is_empty() || !next.is_empty() {
                if !text.is_empty() {
                    text.push('\n');
                }
                match next.strip_suffix("\"\"\"") {
                    Some(last) => {
                        text.push_str(last);
                        return Ok(Input::Message(text.trim_end().to_string()));
                    }
                    None => text.push_str(next),
                }
            }
        }
    }
    if trimmed.starts_with('/') {
        return Ok(Input::Command(trimmed.trim().to_string()));
    }
    Ok(Input::Message(trimmed.to_string()))
}

/// Runs the chat until `/bye` or the end of `input`; answers stream to `out`.
pub fn chat(
    name: &str,
    backend: &Backend,
    system: Option<&str>,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> Result<()> {
    let mut history: Vec<Message> = Vec::new();
    loop {
        let text = match read_input(input, out)? {
            Input::End => {
                writeln!(out)?;
                return Ok(());
            }
            Input::Command(c) => {
                match c.split_whitespace().next().unwrap_or_default() {
                    "/bye" | "/exit" => return Ok(()),
                    "/clear" => {
                        history.clear();
                        writeln!(out, "Cleared session context")?;
                    }
                    "/?" | "/help" => writeln!(out, "{HELP}")?,
                    other => writeln!(out, "Unknown command '{other}'. Type /? for help")?,
                }
                continue;
            }
            Input::Message(t) if t.trim().is_empty() => continue,
            Input::Message(t) => t,
        };
        history.push(Message::new("user", &text));
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.extend(history.iter().cloned());
        match answer(name, backend, &messages, out) {
            Ok(reply) => history.push(Message::new("assistant", &reply)),
            Err(e) => {
                // The turn is dropped so the next one can try again.
                history.pop();
                writeln!(out, "\nError: {e:#}")?;
            }
        }
        writeln!(out, "\n")?;
    }
}

fn answer(
    name: &str,
    backend: &Backend,
    messages: &[Message],
    out: &mut impl Write,
) -> Result<String> {
    match backend {
        Backend::Remote { client, options } => {
            let msgs: Vec<Value> = messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            let (reply, _) = client.chat(name, &msgs, options, |t| {
                out.write_all(t.as_bytes())?;
                out.flush()?;
                Ok(())
            })?;
            Ok(reply)
        }
        Backend::Local { model, options } => {
            let prompt = model.tokenize(&model.render_chat(messages)?)?;
            let mut reply = String::new();
            for piece in model.generate(prompt, options)? {
                let piece = piece?;
                out.write_all(piece.text.as_bytes())?;
                out.flush()?;
                reply.push_str(&piece.text);
            }
            Ok(reply)
        }
    }
}
