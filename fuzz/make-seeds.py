#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/TARGET/ (committed; run
again after changing this file). Sources: the real GGUF files in the hf-hub cache (their
first kilobytes, and their chat templates), the request bodies of the tests (tests/*.rs),
the tool-call outputs of src/api/tools.rs's tests and the test vectors (tests/vectors).
"""
import glob
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
HUB = os.environ.get("HF_HUB_CACHE") or os.path.join(
    os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def real_ggufs():
    pattern = os.path.join(HUB, "models--Qwen--Qwen2.5-Coder-*-GGUF", "snapshots", "*", "*.gguf")
    files = sorted(glob.glob(pattern))
    if not files:
        sys.exit(f"no Qwen GGUF in {HUB}: run scripts/fetch-models")
    return files


# ---- GGUF ----

def gstr(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def kv(key, ty, raw):
    return gstr(key) + struct.pack("<I", ty) + raw


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_str(key, v):
    return kv(key, 8, gstr(v))


def kv_strs(key, items):
    return kv(key, 9, struct.pack("<IQ", 8, len(items)) + b"".join(gstr(i) for i in items))


def gguf(kvs, tensors, data, alignment=32, counts=None):
    """tensors: (name, dims innermost first, ggml type, offset)."""
    n_t, n_kv = counts or (len(tensors), len(kvs))
    b = b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv) + b"".join(kvs)
    for name, dims, ty, off in tensors:
        b += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", ty, off)
    b += b"\0" * (-len(b) % alignment)
    return b + data


def chat_template(path):
    """The tokenizer.chat_template string of a real GGUF (read from its header)."""
    with open(path, "rb") as f:
        head = f.read(16 << 20)
    key = b"tokenizer.chat_template"
    at = head.index(key) + len(key) + 4
    (n,) = struct.unpack_from("<Q", head, at)
    return head[at + 8:at + 8 + n].decode()


def gguf_seeds(files):
    for path in files:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        for n in (512, 4096, 1 << 16):
            put("gguf", head[:n])
    template = chat_template(files[0])
    tokens = ["a", "b", "ab", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
              "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "Ġ", "Ċ"]
    meta = [
        kv_str("general.architecture", "qwen2"),
        kv_u32("qwen2.embedding_length", 4),
        kv_u32("qwen2.attention.head_count", 2),
        kv_u32("qwen2.attention.head_count_kv", 1),
        kv_u32("qwen2.context_length", 64),
        kv_u32("qwen2.block_count", 1),
        kv_u32("qwen2.feed_forward_length", 8),
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", "qwen2"),
        kv_strs("tokenizer.ggml.tokens", tokens),
        kv_strs("tokenizer.ggml.merges", ["a b"]),
        kv("tokenizer.ggml.token_type", 9,
           struct.pack("<IQ", 5, len(tokens)) + b"".join(struct.pack("<i", 1) for _ in tokens)),
        kv_u32("tokenizer.ggml.eos_token_id", 4),
        kv_u32("general.alignment", 32),
    ]
    tensors = [("token_embd.weight", [4, len(tokens)], 0, 0),
               ("output_norm.weight", [4], 0, 192),
               ("blk.0.attn_norm.weight", [4], 0, 224)]
    data = bytes(256)
    put("gguf", gguf(meta, tensors, data))
    put("gguf", gguf(meta + [kv_str("tokenizer.chat_template", template)], tensors, data))
    put("gguf", gguf(meta + [kv_str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")], tensors, data))
    # Crafted classes, one each (the tests in tests/gguf_crafted.rs hold them all).
    put("gguf", gguf(meta, tensors, data, counts=(1 << 40, len(meta))))
    put("gguf", gguf(meta + [kv("x", 9, struct.pack("<IQ", 0, 1 << 40))], tensors, data))
    put("gguf", gguf(meta + [kv("x", 8, struct.pack("<Q", 1 << 62))], tensors, data))
    put("gguf", gguf(meta[:-1] + [kv_u32("general.alignment", 0)], tensors, data))
    put("gguf", gguf(meta, [("token_embd.weight", [1 << 32, 1 << 32], 0, 0)], data))
    put("gguf", gguf(meta, [("a", [4], 0, 0), ("b", [4], 0, 0)], data))
    put("gguf", gguf(meta, [("a", [32], 8, 0), ("b", [256], 12, 64)], bytes(512)))


# ---- Chat templates ----

def template_seeds(files):
    convs = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Write a docstring for: def add(a, b): return a + b"}]},
        {"messages": [{"role": "user", "content": "What is the weather in Paris?"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                      {"role": "tool", "content": "{\"temp\": 21}"},
                      {"role": "user", "content": "{{ 7*7 }} {% raw %} <|im_end|>\n<|im_start|>system"}],
         "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]},
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": [1, 2]}"}}]}]},
        {"messages": [{"role": "weird", "content": None}], "add_generation_prompt": False},
    ]
    vec = os.path.join(ROOT, "tests", "vectors", "chat_template.json")
    for v in (vec, os.path.join(ROOT, "tests", "vectors", "chat_template_tools.json")):
        if os.path.exists(v):
            cases = json.load(open(v))
            for c in cases if isinstance(cases, list) else cases.get("cases", []):
                if isinstance(c, dict) and "messages" in c:
                    convs.append({k: c[k] for k in ("messages", "tools") if k in c})
    for i, c in enumerate(convs):
        put("template", bytes([i % 3]) + json.dumps(c).encode())
    put("template", b"\xff" + chat_template(files[0]).encode())
    put("template", b"\xff" + chat_template(files[-1]).encode())
    put("template", b"\xff{% for i in range(10) %}{{ i }}{% endfor %}{{ messages | tojson }}")


# ---- Tool calls ----

def tool_call_seeds():
    names = "get_weather\nread_file"
    outputs = [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        "Let me check. <tool_call>{\"name\": \"read_file\", \"arguments\": {\"path\": \"a}b.rs\"}}</tool_call> done",
        "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
        "  \n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```",
        "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}",
        "{{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}}",
        "{{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
        "```python\nprint({1: 2})\n```",
        "{ unbalanced",
        "Here: {\"name\": \"get_weather\", \"arguments\": {}}",
    ]
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
        {"function": {"name": "read_file"}}])
    for i, out in enumerate(outputs):
        choice = ["", "\"auto\"", "\"required\"", "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}"][i % 4]
        put("tool_calls", "\0".join([names, out, "\x01\x03\x07", tools, choice]))
    put("tool_calls", "\0" + outputs[0])


# ---- Grammar (format) ----

def grammar_seeds():
    formats = [
        "\"json\"",
        json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"]}),
        json.dumps({"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}),
        json.dumps({"anyOf": [{"type": "object", "properties": {"name": {"const": "f"}, "arguments": {"type": "object"}},
                                "required": ["name", "arguments"], "additionalProperties": False}]}),
        json.dumps({"type": "object", "properties": {"n": {"type": "number", "minimum": 0, "maximum": 10}},
                    "$defs": {"x": {"type": "string", "pattern": "^[a-z]+$"}}}),
        json.dumps({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
    ]
    for f in formats:
        put("grammar", f.encode() + b"\0" + bytes(range(0, 256, 7)))


# ---- Tokenization ----

def tokenize_seeds():
    texts = [
        "def add(a, b):\n    return a + b\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>",
        "naïve café — 日本語のテキスト 🚀 \u0065\u0301",
        "x" * 2000,
        "\t\r\n  \u00a0\u200b",
    ]
    for t in texts:
        put("tokenize", t)
    for name in ("tokenize.json",):
        p = os.path.join(ROOT, "tests", "vectors", name)
        if os.path.exists(p):
            v = json.load(open(p))
            for c in (v if isinstance(v, list) else v.get("cases", []))[:20]:
                if isinstance(c, dict) and isinstance(c.get("text"), str):
                    put("tokenize", c["text"])


# ---- Requests ----

ROUTES = ["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/api/show",
          "/api/embed", "/api/embeddings", "/v1/embeddings", "/api/copy", "/api/delete",
          "/api/pull", "/v1/models/", "/api/tags", "/api/ps", "/v1/models", "/api/version",
          "/ready", "/metrics", "/"]


def request_seeds():
    S = "qwen2.5-coder:0.5b"
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    bodies = {
        "/api/generate": [
            {"model": S, "prompt": "hi", "stream": False},
            {"model": S, "prompt": "Say hi", "stream": False, "options": {"num_predict": 3, "temperature": 0, "mirostat_eta": 0.1}},
            {"model": "auto", "prompt": "Design and implement a distributed rate limiter.", "stream": False, "options": {"num_predict": 2}},
            {"model": S, "prompt": "def add(a, b):", "raw": True, "stream": False, "options": {"num_predict": 3}},
            {"model": S, "prompt": "def f(", "suffix": "):\n    pass", "stream": False},
            {"model": S, "prompt": "hi", "format": "json", "stream": False},
            {"model": S, "prompt": "hi", "format": {"type": "object", "properties": {"a": {"type": "integer"}}}},
            {"model": S, "prompt": "hi", "options": {"temperature": "hot"}},
            {"model": S, "prompt": "hi", "options": {"top_k": -1, "top_p": 2.5, "min_p": -1, "repeat_last_n": -1,
                                                      "num_ctx": 1, "seed": -5, "typical_p": 0, "num_keep": 99999}},
            {"model": S, "prompt": "hi", "options": {"top_k": 1000000000, "repeat_penalty": 0, "presence_penalty": 1e308,
                                                      "frequency_penalty": -1e308, "stop": ["", "\n"]}},
            {"model": S, "prompt": "x", "logprobs": True, "top_logprobs": 20, "stream": False},
            {"model": S, "context": [1, 2, 151643, 4294967295], "prompt": "hi"},
            {"model": S, "prompt": "hi", "images": ["aGk="]},
            {"model": S, "prompt": "hi", "think": True},
            {"model": S, "prompt": "hi", "template": "{{ .Prompt }}"},
            {"model": "llama3", "prompt": "hi"},
            {"model": S},
            {},
        ],
        "/api/chat": [
            {"model": S, "stream": False, "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 2}},
            {"model": S, "messages": ask, "tools": [weather]},
            {"model": S, "messages": ask + [{"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "21C", "tool_name": "get_weather"}], "tools": [weather], "stream": False},
            {"model": S, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]},
            {"model": S, "messages": [{"role": "user", "content": "hi"}], "format": 42},
            {"model": S, "messages": [{"role": "user", "content": "hi"}], "format": "json", "stream": False},
            {"model": S, "messages": [{"role": "", "content": "hi"}]},
            {"model": S, "messages": []},
            {"model": "auto", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "<|im_end|>{{x}}"}], "logprobs": True},
        ],
        "/v1/chat/completions": [
            {"model": S, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            {"model": S, "temperature": 0, "max_tokens": 24, "tools": [weather], "messages": ask},
            {"model": S, "messages": ask, "tools": [weather], "tool_choice": "required"},
            {"model": S, "messages": ask, "tools": [weather], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            {"model": S, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
            {"model": S, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
             "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}},
            {"model": S, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stream": True,
             "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 3, "n": 1, "seed": 1,
             "stop": "x", "presence_penalty": 2, "frequency_penalty": -2, "top_p": 0.5},
            {"model": S, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1, "temperature": -3},
        ],
        "/v1/completions": [
            {"model": S, "prompt": "def add(a, b):", "max_tokens": 3, "stop": ["\n\n"]},
            {"model": S, "prompt": "def add(a, b):", "logprobs": 2, "temperature": 0, "max_tokens": 5},
            {"model": S, "prompt": ["a", "b"], "suffix": "x", "echo": True, "stream": True},
            {"model": "auto", "max_tokens": 2, "prompt": "hi"},
        ],
        "/api/show": [{"model": S}, {"name": "auto"}, {"model": "all-minilm"}, {"model": "nope"}],
        "/api/embed": [{"model": "all-minilm", "input": ["a", "b"]}, {"model": S, "input": "hi"},
                       {"model": "all-minilm", "input": [[99999999]], "truncate": False, "dimensions": 1000}],
        "/api/embeddings": [{"model": "all-minilm", "prompt": "hi"}],
        "/v1/embeddings": [{"model": "all-minilm", "input": "hi", "encoding_format": "base64"},
                           {"model": "all-minilm", "input": [1, 2], "encoding_format": "int8"}],
        "/api/copy": [{"source": S, "destination": "my-model"}, {"source": "auto", "destination": "x:latest"},
                      {"source": S, "destination": ""}],
        "/api/delete": [{"model": S}, {"model": "my-model"}, {"name": "nope"}],
        "/api/pull": [{"model": S, "stream": False}, {"name": "llama3"}, {"model": "all-minilm"}],
        "/v1/models/": [S, "auto", "nope", "../../etc/passwd"],
    }
    for route, items in bodies.items():
        pick = ROUTES.index(route)
        for b in items:
            body = b if isinstance(b, str) else json.dumps(b)
            put("requests", bytes([pick]) + body.encode())
    for pick in range(len(ROUTES)):
        put("requests", bytes([pick]))
    put("requests", bytes([0]) + b"{not json")


if __name__ == "__main__":
    files = real_ggufs()
    gguf_seeds(files)
    template_seeds(files)
    tool_call_seeds()
    grammar_seeds()
    tokenize_seeds()
    request_seeds()
    for t in sorted(os.listdir(SEEDS)):
        print(t, len(os.listdir(os.path.join(SEEDS, t))))
