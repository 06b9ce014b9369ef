"""What agents and IDEs do, through the official ollama and openai Python clients, unchanged:
tool calls (streamed and not, with the result sent back), schema-constrained output,
embeddings, and keep_alive unloading. Run by scripts/test against `duet serve` (CPU layout)."""

import base64
import datetime
import json
import math
import struct
import time

import ollama
import openai
import pytest
from pydantic import BaseModel

from conftest import EMBED, LARGE, SMALL, VECTORS


def get_weather(city: str) -> str:
    """Current weather for a city.

    Args:
      city: The city's name
    """
    return "18 C, cloudy"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def test_ollama_tool_call_round_trip(oc):
    # The client turns a Python function into the tool's schema itself.
    r = oc.chat(model=LARGE, messages=ASK, tools=[get_weather], options={"temperature": 0})
    calls = r.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments["city"] == "Paris"
    assert r.done_reason == "stop"
    # Streamed: the call arrives in a chunk of its own.
    chunks = list(oc.chat(model=LARGE, messages=ASK, tools=[WEATHER], stream=True, options={"temperature": 0}))
    streamed = [c for ch in chunks for c in (ch.message.tool_calls or [])]
    assert [c.function.name for c in streamed] == ["get_weather"]
    assert chunks[-1].done
    # The result goes back as role "tool"; asked not to call again, the model answers in text.
    history = ASK + [
        r.message,
        {"role": "tool", "tool_name": "get_weather", "content": get_weather("Paris")},
        {"role": "user", "content": "So, do I need a coat? Answer in one sentence without calling tools."},
    ]
    final = oc.chat(model=LARGE, messages=history, tools=[get_weather], options={"temperature": 0, "num_predict": 40})
    assert final.message.content and not final.message.tool_calls


def test_openai_tool_calls_streamed_and_not(ai):
    r = ai.chat.completions.create(model=LARGE, messages=ASK, tools=[WEATHER], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # Streamed: the client's own accumulation of the deltas gives the same call.
    name, args, finish = "", "", None
    for chunk in ai.chat.completions.create(model=LARGE, messages=ASK, tools=[WEATHER], temperature=0, stream=True):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            assert d.index == 0
            name += d.function.name or ""
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"} and finish == "tool_calls"
    # tool_choice "required" makes even the small model call.
    r = ai.chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "Hello!"}], tools=[WEATHER], tool_choice="required", temperature=0
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # The answer to a tool result, through tool_call_id.
    msgs = ASK + [
        choice.message,
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, cloudy"},
        {"role": "user", "content": "So, do I need a coat? Answer in one sentence without calling tools."},
    ]
    r = ai.chat.completions.create(model=LARGE, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40)
    assert r.choices[0].message.content


class Language(BaseModel):
    name: str
    year: int


class Languages(BaseModel):
    languages: list[Language]


def test_schema_output_always_validates(oc, ai):
    # ollama-python's documented way: format=Model.model_json_schema().
    for model in [SMALL, LARGE]:
        r = oc.chat(
            model=model,
            messages=[{"role": "user", "content": "Name three programming languages and the year each appeared."}],
            format=Languages.model_json_schema(),
            options={"temperature": 0, "num_predict": 200},
        )
        parsed = Languages.model_validate_json(r.message.content)
        assert parsed.languages
    r = oc.generate(
        model=SMALL, prompt="Give Rust's name and first release year as a JSON object.", format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    assert r.done_reason == "stop"
    assert isinstance(json.loads(r.response), dict)
    # openai-python's parse helper sends a strict json_schema response_format.
    c = ai.beta.chat.completions.parse(
        model=SMALL,
        messages=[{"role": "user", "content": "Name two programming languages with their year."}],
        response_format=Languages,
        temperature=0,
        max_tokens=200,
    )
    assert c.choices[0].message.parsed.languages


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_match_the_reference(oc, ai):
    ref = json.loads((VECTORS / "embeddings-all-minilm-l6-v2.json").read_text())
    texts = [c["input"] for c in ref["cases"]]
    want = [c["embedding"] for c in ref["cases"]]
    r = oc.embed(model=EMBED, input=texts)
    assert len(r.embeddings) == len(texts)
    for got, w in zip(r.embeddings, want):
        assert cosine(got, w) >= 0.999
        assert abs(math.sqrt(sum(x * x for x in got)) - 1) < 1e-4
    e = ai.embeddings.create(model=EMBED, input=texts[:2])
    assert [d.index for d in e.data] == [0, 1]
    assert cosine(e.data[0].embedding, want[0]) >= 0.999
    # Asked for explicitly, base64 comes back as the client received it: little-endian f32.
    e = ai.embeddings.create(model=EMBED, input=texts[0], encoding_format="base64")
    raw = base64.b64decode(e.data[0].embedding)
    got = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert cosine(got, want[0]) >= 0.999


def test_keep_alive_zero_unloads_and_the_next_request_reloads(oc):
    def loaded():
        return {m.model for m in oc.ps().models}

    r = oc.generate(model=SMALL, prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    for _ in range(200):
        if SMALL not in loaded():
            break
        time.sleep(0.05)
    assert SMALL not in loaded()
    r = oc.generate(model=SMALL, prompt="def add(a, b):", raw=True, options={"temperature": 0, "num_predict": 4})
    assert r.eval_count == 4 and r.load_duration > 0
    assert SMALL in loaded()
    # A duration string from the client, as Continue and Zed send it.
    oc.generate(model=SMALL, prompt="", keep_alive="10m")
    left = [m for m in oc.ps().models if m.model == SMALL][0].expires_at
    secs = (left - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 500 < secs <= 600
    oc.generate(model=SMALL, prompt="", keep_alive=-1)


def test_logprobs_through_both_clients(oc, ai):
    r = oc.generate(model=SMALL, prompt="def add(a, b):", raw=True, logprobs=True, top_logprobs=2,
                    options={"temperature": 0, "num_predict": 5})
    assert len(r.logprobs) == 5
    assert all(len(p.top_logprobs) == 2 and p.logprob <= 0 for p in r.logprobs)
    assert "".join(p.token for p in r.logprobs) == r.response
    c = ai.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "Say hi."}], logprobs=True,
                                   top_logprobs=2, temperature=0, max_tokens=4)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)
