//! The chat template: the Jinja text in the GGUF's `tokenizer.chat_template`, rendered
//! with minijinja the way Hugging Face's transformers renders it (trim_blocks and
//! lstrip_blocks on, Python string methods available).

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's chat template is invalid: {0}")]
    Invalid(String),
    #[error("cannot render the chat template: {0}")]
    Render(String),
}

/// One chat message, as Ollama and OpenAI clients send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// An assistant message's calls, as the templates read them: `{"function": {"name",
    /// "arguments": {…}}}` each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
        }
    }
}

/// The fallback when a GGUF has no template: ChatML, which every Qwen model speaks.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers' chat templates have it: Python's `json.dumps(x,
/// ensure_ascii=False)`, keys in their order, `", "` and `": "` between items (minijinja's
/// own is compact and escapes `<`, `>` and `&`). The Qwen templates write the tools and
/// each call's arguments with it.
fn tojson(value: minijinja::Value) -> Result<minijinja::Value, JinjaError> {
    struct Python;
    /// Python's separator between items: ", " (none before the first).
    fn comma<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    impl serde_json::ser::Formatter for Python {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            comma(w, first)
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            comma(w, first)
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Python);
    value
        .serialize(&mut ser)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(minijinja::Value::from_safe_string(text))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// As [`render`](Self::render), with the tools the model may call (the template
    /// lists them in its system message).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tools = tools.filter(|t| !t.is_empty());
        let budget = Budget::of(messages, tools);
        let tools = match tools {
            Some(t) => minijinja::Value::from_serialize(t),
            None => minijinja::Value::UNDEFINED,
        };
        // The template comes from the model file: bound what one render may run and
        // write, in proportion to the conversation.
        let mut env = self.env.clone();
        env.set_fuel(Some(budget.fuel));
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        let mut out = Capped {
            text: Vec::new(),
            left: budget.output,
            full: false,
        };
        tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                tools => tools,
                bos_token => "",
                eos_token => "<|im_end|>",
            },
            &mut out,
        )
        .map_err(|e| {
            TemplateError::Render(if out.full {
                format!("its output would exceed {} bytes", budget.output)
            } else {
                e.to_string()
            })
        })?;
        String::from_utf8(out.text).map_err(|e| TemplateError::Render(e.to_string()))
    }
}

/// What one render may cost: template instructions (minijinja's fuel) and bytes of
/// output. The Qwen templates run about 45 instructions a message and write the
/// messages with a few dozen bytes of markup each; a template made to loop (nested
/// `range`s) or to repeat strings without end stops at these bounds instead of holding
/// a worker or memory.
struct Budget {
    fuel: u64,
    output: usize,
}

impl Budget {
    const FUEL_BASE: u64 = 100_000;
    const FUEL_PER_ITEM: u64 = 200;
    const OUTPUT_BASE: usize = 1 << 20;
    const OUTPUT_PER_ITEM: usize = 256;

    fn of(messages: &[Message], tools: Option<&[serde_json::Value]>) -> Self {
        let json_len =
            |v: &[serde_json::Value]| -> usize { v.iter().map(|v| v.to_string().len()).sum() };
        let calls: usize = messages
            .iter()
            .map(|m| m.tool_calls.as_ref().map_or(0, Vec::len))
            .sum();
        let items = messages.len() + calls + tools.map_or(0, <[_]>::len);
        let bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len() + m.tool_calls.as_deref().map_or(0, json_len))
            .sum::<usize>()
            + tools.map_or(0, json_len);
        Self {
            fuel: Self::FUEL_BASE + Self::FUEL_PER_ITEM * items as u64,
            output: Self::OUTPUT_BASE + 4 * bytes + Self::OUTPUT_PER_ITEM * items,
        }
    }
}

/// The rendered text, refusing to grow past its budget.
struct Capped {
    text: Vec<u8>,
    left: usize,
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.left {
            self.full = true;
            return Err(std::io::Error::other(
                "the chat template's output is too long",
            ));
        }
        self.left -= b.len();
        self.text.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn hi() -> Vec<Message> {
        vec![Message::new("user", "hi")]
    }

    /// Found by fuzzing (a GGUF's template is the file's to choose): nested loops ran
    /// for seconds per render, as long as the template liked.
    #[test]
    fn a_template_that_loops_stops() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ b }}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let start = Instant::now();
        let e = t.render(&hi(), true).unwrap_err().to_string();
        assert!(e.contains("fuel"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_template_that_writes_without_end_stops() {
        let t = ChatTemplate::new("{% for a in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}")
            .unwrap();
        let e = t.render(&hi(), true).unwrap_err().to_string();
        assert!(e.contains("output would exceed"), "{e}");
    }

    #[test]
    fn long_conversations_stay_within_the_budget() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let messages: Vec<Message> = (0..100_000)
            .map(|i| Message::new(["user", "assistant"][i % 2], "x"))
            .collect();
        let text = t.render(&messages, true).unwrap();
        assert_eq!(text.matches("<|im_start|>").count(), 100_001);
    }
}
