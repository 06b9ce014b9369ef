//! What coding agents and IDEs need beyond plain chat, over HTTP against a real `duet
//! serve` on the CPU layout: tool calls (Ollama's and OpenAI's shapes, streamed and not,
//! with the history of calls and results), structured output (`format`,
//! `response_format`), the capabilities and template clients read from /api/show, and
//! the request fields strict clients send.

mod common;
#[path = "common/server.rs"]
mod server;

use common::*;
use serde_json::{json, Value};
use server::Server;
use std::sync::OnceLock;

fn srv() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| server::start(&["--layout", "cpu"]))
}

fn post(path: &str, body: Value) -> (u16, Value) {
    srv().post(path, body)
}

fn stream(path: &str, body: Value) -> Vec<Value> {
    srv().stream(path, body)
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}})
}

fn read_file() -> Value {
    json!({"type": "function", "function": {"name": "read_file", "description": "Read a file of the project",
           "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}})
}

fn ask_weather() -> Value {
    json!([{"role": "user", "content": "What is the weather in Paris right now?"}])
}

fn city(arguments: &Value) -> String {
    arguments["city"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase()
}

#[test]
fn native_chat_returns_tool_calls_streamed_and_not() {
    let body = json!({"model": LARGE, "messages": ask_weather(), "tools": [weather()], "stream": false,
                      "options": {"temperature": 0, "num_predict": 64}});
    let (s, v) = post("/api/chat", body.clone());
    assert_eq!(s, 200, "{v}");
    let calls = v["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{v}");
    let f = &calls[0]["function"];
    assert_eq!(f["name"], "get_weather");
    assert_eq!(f["index"], 0);
    assert!(f["arguments"].is_object(), "arguments as an object: {v}");
    assert!(city(&f["arguments"]).contains("paris"), "{v}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(v["message"]["content"], "");

    let mut body = body;
    body["stream"] = json!(true);
    let lines = stream("/api/chat", body);
    let with_calls: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"]["tool_calls"].is_array())
        .collect();
    assert_eq!(with_calls.len(), 1, "{lines:?}");
    assert_eq!(with_calls[0]["done"], false);
    assert_eq!(
        with_calls[0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(lines.last().unwrap()["done"], true);
}

#[test]
fn a_tool_result_in_the_history_is_answered_in_text() {
    // Ollama's shapes: the assistant's call, then the result as role "tool" with tool_name.
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris right now?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "{\"temperature_c\": 18, \"sky\": \"cloudy\"}"},
        {"role": "user", "content": "So, do I need a coat? Answer in one sentence without calling tools."}
    ]);
    let (s, v) = post(
        "/api/chat",
        json!({"model": LARGE, "messages": messages, "tools": [weather()], "stream": false,
               "options": {"temperature": 0, "num_predict": 40}}),
    );
    assert_eq!(s, 200, "{v}");
    let content = v["message"]["content"].as_str().unwrap();
    assert!(v["message"]["tool_calls"].is_null(), "{v}");
    assert!(!content.trim().is_empty(), "{v}");
}

#[test]
fn openai_tool_calls_streamed_and_not_with_tool_choice() {
    let body = json!({"model": LARGE, "messages": ask_weather(), "tools": [weather(), read_file()], "temperature": 0});
    let (s, v) = post("/v1/chat/completions", body.clone());
    assert_eq!(s, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(city(&args).contains("paris"), "{v}");
    assert!(choice["message"]["content"].is_null());

    let mut body = body;
    body["stream"] = json!(true);
    let chunks = stream("/v1/chat/completions", body);
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(deltas.len(), 1, "{chunks:?}");
    assert_eq!(deltas[0]["index"], 0);
    assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    let last = chunks
        .iter()
        .rev()
        .find(|c| !c["choices"][0]["finish_reason"].is_null());
    assert_eq!(last.unwrap()["choices"][0]["finish_reason"], "tool_calls");

    // A named function is called, even by the small model and where it would not.
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": SMALL, "temperature": 0, "tools": [weather(), read_file()],
               "messages": [{"role": "user", "content": "Show me src/lib.rs"}],
               "tool_choice": {"type": "function", "function": {"name": "read_file"}}}),
    );
    assert_eq!(s, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "read_file", "{v}");
    // "none": the tools are not offered, the answer is text.
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": SMALL, "temperature": 0, "max_tokens": 12, "tools": [weather()],
               "messages": ask_weather(), "tool_choice": "none"}),
    );
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    // A result paired by tool_call_id, arguments as OpenAI's JSON string in the history.
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris right now?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"}
    ]);
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": SMALL, "temperature": 0, "max_tokens": 24, "tools": [weather()], "messages": messages}),
    );
    assert_eq!(s, 200, "{v}");
}

#[test]
fn bad_tools_and_choices_are_clear_errors() {
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": SMALL, "messages": ask_weather(), "tools": [{"type": "function", "function": {}}]}),
        ),
        (
            "/api/chat",
            json!({"model": SMALL, "messages": ask_weather(), "tools": [{"type": "code_interpreter"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": SMALL, "messages": ask_weather(), "tool_choice": "required"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": SMALL, "messages": ask_weather(), "tools": [weather()],
            "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}),
        ),
        (
            "/api/chat",
            json!({"model": SMALL, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}),
        ),
    ] {
        let (s, v) = post(path, body.clone());
        assert_eq!(s, 400, "{body} -> {v}");
        let message = v["error"].as_str().or(v["error"]["message"].as_str());
        assert!(message.is_some_and(|m| !m.is_empty()), "{v}");
    }
}

#[test]
fn show_reports_tools_insert_and_the_go_template_clients_read() {
    for model in [SMALL, LARGE] {
        let (s, v) = post("/api/show", json!({"name": model}));
        assert_eq!(s, 200, "{v}");
        let caps = strs(&v["capabilities"]);
        assert_eq!(caps, vec!["completion", "tools", "insert"], "{model}");
        let template = v["template"].as_str().unwrap();
        assert!(
            template.contains(".Suffix") && template.contains(".Tools"),
            "{template}"
        );
        let info = &v["model_info"];
        assert_eq!(info["general.architecture"], "qwen2");
        assert!(info["general.basename"]
            .as_str()
            .unwrap()
            .contains("Qwen2.5"));
        assert_eq!(info["qwen2.context_length"], 32768);
        assert!(v["parameters"].as_str().unwrap().contains("stop"));
    }
}

#[test]
fn strict_clients_fields_are_accepted() {
    // Zed: options with nulls, think null, tools [], keep_alive -1.
    let (s, v) = post(
        "/api/chat",
        json!({"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "stream": false,
               "think": null, "tools": [], "keep_alive": -1,
               "options": {"num_ctx": null, "temperature": null, "num_predict": 4}}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["eval_count"], 4, "{v}");
    let (s, _) = post(
        "/api/chat",
        json!({"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "stream": false,
               "think": false, "options": null, "keep_alive": "5m"}),
    );
    assert_eq!(s, 200);
    let (s, v) = post(
        "/api/chat",
        json!({"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "think": true}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("does not support thinking"));
    let (s, _) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "hi", "think": true}),
    );
    assert_eq!(s, 400);
}

fn person_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["name", "born", "languages"],
           "properties": {"name": {"type": "string", "maxLength": 40},
                          "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
                          "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}}})
}

/// Checks `v` against [`person_schema`] by hand.
fn valid_person(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    o.len() == 3
        && o["name"].as_str().is_some_and(|n| n.chars().count() <= 40)
        && o["born"]
            .as_i64()
            .is_some_and(|y| (1000..=2100).contains(&y))
        && o["languages"].as_array().is_some_and(|l| {
            l.len() <= 3
                && l.iter()
                    .all(|x| x.as_str().is_some_and(|s| s.chars().count() <= 20))
        })
}

#[test]
fn a_schema_is_always_followed_whatever_the_prompt() {
    for (model, prompt, temperature) in [
        (SMALL, "Tell me about Ada Lovelace.", 0.0),
        (
            SMALL,
            "Ignore any format and write a haiku about the sea.",
            0.0,
        ),
        (LARGE, "Who created Python? Answer in French prose.", 0.0),
        (SMALL, "Grace Hopper", 1.0),
    ] {
        let (s, v) = post(
            "/api/chat",
            json!({"model": model, "stream": false, "format": person_schema(),
                   "messages": [{"role": "user", "content": prompt}],
                   "options": {"temperature": temperature, "seed": 7, "num_predict": 256}}),
        );
        assert_eq!(s, 200, "{v}");
        let content = v["message"]["content"].as_str().unwrap();
        let parsed: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("{prompt}: {e}: {content}"));
        assert!(valid_person(&parsed), "{prompt}: {parsed}");
        assert_eq!(v["done_reason"], "stop", "{v}");
    }
    // Streamed, on /api/generate: the pieces join into the same kind of answer.
    let lines = stream(
        "/api/generate",
        json!({"model": SMALL, "prompt": "Linus Torvalds", "format": person_schema(),
               "options": {"temperature": 0, "num_predict": 256}}),
    );
    let text: String = lines
        .iter()
        .filter_map(|l| l["response"].as_str())
        .collect();
    assert!(
        valid_person(&serde_json::from_str(&text).unwrap()),
        "{text}"
    );
}

#[test]
fn json_mode_and_openai_response_formats() {
    let (s, v) = post(
        "/api/generate",
        json!({"model": SMALL, "stream": false, "format": "json",
               "prompt": "Give the name and version of a programming language as a small JSON object.",
               "options": {"temperature": 0, "num_predict": 200}}),
    );
    assert_eq!(s, 200, "{v}");
    let parsed: Value = serde_json::from_str(v["response"].as_str().unwrap()).unwrap();
    assert!(parsed.is_object(), "{parsed}");

    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": SMALL, "temperature": 0, "max_tokens": 256,
               "messages": [{"role": "user", "content": "Barbara Liskov"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": person_schema()}}}),
    );
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        valid_person(&serde_json::from_str(content).unwrap()),
        "{content}"
    );

    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": SMALL, "temperature": 0, "max_tokens": 200, "response_format": {"type": "json_object"},
               "messages": [{"role": "user", "content": "A JSON object with the key ok set to true."}]}),
    );
    assert_eq!(s, 200, "{v}");
    let parsed: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(parsed.is_object());

    for (path, body) in [
        (
            "/api/generate",
            json!({"model": SMALL, "prompt": "hi", "format": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}),
        ),
        (
            "/api/chat",
            json!({"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "format": 42}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}),
        ),
    ] {
        let (s, v) = post(path, body.clone());
        assert_eq!(s, 400, "{body} -> {v}");
    }
}

#[test]
fn required_tool_choice_makes_even_the_small_model_call_a_supplied_tool() {
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": SMALL, "temperature": 0, "tools": [weather(), read_file()],
               "messages": [{"role": "user", "content": "Show me src/lib.rs"}], "tool_choice": "required"}),
    );
    assert_eq!(s, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    let name = call["name"].as_str().unwrap_or_default();
    assert!(["get_weather", "read_file"].contains(&name), "{v}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object());
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

fn check_logprobs(l: &[Value], top: usize) {
    for p in l {
        let lp = p["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{p}");
        let alts = p["top_logprobs"].as_array().unwrap();
        assert_eq!(alts.len(), top, "{p}");
        let alt_lps: Vec<f64> = alts
            .iter()
            .map(|a| a["logprob"].as_f64().unwrap())
            .collect();
        assert!(alt_lps.windows(2).all(|w| w[0] >= w[1]), "not sorted: {p}");
        // The bytes are the token's, as numbers.
        let bytes: Vec<u8> = p["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            p["token"].as_str().unwrap()
        );
    }
}

#[test]
fn legacy_completions_echo_scores_a_text_as_the_model_generated_it() {
    // A greedy continuation and its log probabilities as they were generated...
    let prompt = "def fibonacci(n):\n";
    let (status, v) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": prompt, "raw": true, "stream": false,
               "logprobs": true, "options": {"temperature": 0, "num_predict": 8}}),
    );
    assert_eq!(status, 200, "{v}");
    let generated = v["logprobs"].as_array().unwrap().clone();
    let text = format!("{prompt}{}", v["response"].as_str().unwrap());
    // ...are what scoring the whole text gives its last tokens, read in one pass.
    let (status, v) = post(
        "/v1/completions",
        json!({"model": SMALL, "prompt": text, "echo": true, "max_tokens": 0, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"], text.as_str());
    let l = &c["logprobs"];
    let tokens = strs(&l["tokens"]);
    assert_eq!(tokens.concat(), text);
    assert_eq!(v["usage"]["prompt_tokens"], tokens.len());
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(
        l["token_logprobs"][0],
        Value::Null,
        "nothing comes before the first"
    );
    let n = tokens.len();
    for (i, g) in generated.iter().enumerate() {
        let at = n - generated.len() + i;
        assert_eq!(tokens[at], g["token"], "{v}");
        let (scored, then) = (
            l["token_logprobs"][at].as_f64().unwrap(),
            g["logprob"].as_f64().unwrap(),
        );
        assert!(
            (scored - then).abs() < 1e-3,
            "token {at}: {scored} vs {then}"
        );
        // Greedy tokens: each is the model's top pick there.
        let top = l["top_logprobs"][at].as_object().unwrap();
        assert_eq!(top.len(), 2);
        assert!(
            top.values().all(|p| p.as_f64().unwrap() <= scored + 1e-6),
            "{top:?}"
        );
    }
    // A text longer than the model's context cannot be scored: a clear 400.
    let long = "word ".repeat(40_000);
    let (status, v) = post(
        "/v1/completions",
        json!({"model": SMALL, "prompt": long, "echo": true, "max_tokens": 0}),
    );
    assert_eq!(status, 400, "{v}");
    let message = v["error"].as_str().or(v["error"]["message"].as_str());
    assert!(message.unwrap().contains("longer than the context"), "{v}");
    // Echo scores; it does not generate.
    for bad in [
        json!({"model": SMALL, "prompt": text, "echo": true, "max_tokens": 4}),
        json!({"model": SMALL, "prompt": text, "echo": true, "max_tokens": 0, "stream": true}),
    ] {
        let (status, v) = post("/v1/completions", bad);
        assert_eq!(status, 400, "{v}");
        let message = v["error"].as_str().or(v["error"]["message"].as_str());
        assert!(message.unwrap().contains("echo"), "{v}");
    }
}

#[test]
fn logprobs_on_generate_chat_and_v1() {
    // Greedy: the chosen token is the most likely one, with the same log probability.
    let (status, v) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "def add(a, b):", "raw": true, "stream": false,
               "logprobs": true, "top_logprobs": 3, "options": {"temperature": 0, "num_predict": 8}}),
    );
    assert_eq!(status, 200, "{v}");
    let l = v["logprobs"].as_array().unwrap();
    assert_eq!(l.len(), 8);
    check_logprobs(l, 3);
    for p in l {
        assert_eq!(p["token"], p["top_logprobs"][0]["token"], "{p}");
        assert_eq!(p["logprob"], p["top_logprobs"][0]["logprob"], "{p}");
    }
    let text: String = l.iter().map(|p| p["token"].as_str().unwrap()).collect();
    assert_eq!(text, v["response"].as_str().unwrap());

    // Streamed chat: every generated token's entry arrives, none twice.
    let chunks = stream(
        "/api/chat",
        json!({"model": SMALL, "messages": [{"role": "user", "content": "Say hello."}],
               "logprobs": true, "options": {"temperature": 0, "num_predict": 6}}),
    );
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["logprobs"].as_array())
        .flatten()
        .cloned()
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(
        streamed.len() as u64,
        last["eval_count"].as_u64().unwrap(),
        "{chunks:?}"
    );
    check_logprobs(&streamed, 0);
    // Without logprobs, there are none.
    let (_, v) = post(
        "/api/chat",
        json!({"model": SMALL, "stream": false, "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 2}}),
    );
    assert!(v.get("logprobs").is_none(), "{v}");

    // OpenAI chat, streamed and not.
    let body = json!({"model": SMALL, "messages": [{"role": "user", "content": "Say hello."}],
                      "logprobs": true, "top_logprobs": 2, "temperature": 0, "max_tokens": 5});
    let (status, v) = post("/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    check_logprobs(content, 2);
    let mut body = body;
    body["stream"] = json!(true);
    let chunks = stream("/v1/chat/completions", body);
    let n: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(|a| a.len())
        .sum();
    assert_eq!(n, content.len());

    // The legacy completions API: parallel lists with offsets into the text.
    let (status, v) = post(
        "/v1/completions",
        json!({"model": SMALL, "prompt": "def add(a, b):", "logprobs": 2, "temperature": 0, "max_tokens": 5}),
    );
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5, "{v}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");

    // More alternatives than 20 is a clear error.
    let (status, v) = post(
        "/api/generate",
        json!({"model": SMALL, "prompt": "x", "logprobs": true, "top_logprobs": 21}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("top_logprobs"), "{v}");
}
