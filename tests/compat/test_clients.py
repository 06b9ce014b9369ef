"""The official ollama and openai Python clients, unchanged, against a running duet serve.

Run by scripts/test with DUET_URL pointing at the server (CPU layout)."""

import json

import ollama
import openai
import pytest

from conftest import EMBED, LARGE, SMALL, VECTORS


def greedy_case(i):
    cases = json.loads((VECTORS / "greedy-qwen2.5-coder-0.5b-instruct-q4_k_m.json").read_text())["cases"]
    return cases[i]


def test_list_show_ps(oc):
    names = [m.model for m in oc.list().models]
    assert names == [SMALL, LARGE, "auto", EMBED]
    assert oc.show("auto").capabilities == ["completion", "tools", "insert"]
    show = oc.show(LARGE)
    assert show.modelinfo["general.architecture"] == "qwen2"
    assert show.details.family == "qwen2"
    assert "<|im_start|>" in show.template
    running = oc.ps().models
    # The embedder is listed once it has loaded (it loads in the background).
    assert {m.model for m in running} - {EMBED} == {SMALL, LARGE}
    assert all(m.size_vram == 0 for m in running)


def test_generate_greedy_matches_vectors(oc):
    case = greedy_case(0)
    r = oc.generate(model=SMALL, prompt=case["prompt"], raw=True, options={"temperature": 0, "num_predict": 16})
    assert r.done and r.done_reason == "length"
    assert r.context[-16:] == case["greedy_ids"][:16]
    assert r.eval_count == 16 and r.prompt_eval_count == len(case["prompt_ids"])


def test_generate_streamed(oc):
    parts = list(oc.generate(model=SMALL, prompt="Write a haiku about Rust.", stream=True, options={"num_predict": 10, "seed": 1}))
    assert parts[-1].done
    assert all(not p.done for p in parts[:-1])
    assert "".join(p.response for p in parts).strip()


def test_chat_seeded_is_reproducible(oc):
    msgs = [{"role": "user", "content": "Name a sorting algorithm."}]
    opts = {"seed": 7, "temperature": 1.0, "num_predict": 12}
    a = oc.chat(model=SMALL, messages=msgs, options=opts)
    b = oc.chat(model=SMALL, messages=msgs, options=opts)
    assert a.message.content == b.message.content
    assert a.message.role == "assistant"


def test_chat_streamed_multi_turn(oc):
    msgs = [
        {"role": "user", "content": "Add type hints: def greet(name): return 'hi ' + name"},
        {"role": "assistant", "content": "def greet(name: str) -> str:\n    return 'hi ' + name"},
        {"role": "user", "content": "Now add a docstring."},
    ]
    chunks = list(oc.chat(model=LARGE, messages=msgs, stream=True, options={"num_predict": 8, "temperature": 0}))
    assert chunks[-1].done and chunks[-1].done_reason == "length"
    assert "".join(c.message.content for c in chunks)


def test_ollama_errors_raise_response_error(oc):
    with pytest.raises(ollama.ResponseError) as e:
        oc.generate(model="no-such-model", prompt="hi")
    assert e.value.status_code == 404
    assert "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model=SMALL, messages=[{"role": "user", "content": "hi"}], think=True)
    assert e.value.status_code == 400


def test_openai_chat_greedy_matches_vectors(ai, oc):
    case = greedy_case(2)
    r = ai.chat.completions.create(
        model=SMALL, temperature=0, max_tokens=16, messages=[{"role": "user", "content": "Implement a Python function is_prime(n)."}]
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16
    assert r.choices[0].message.content == "".join(
        p.response for p in oc.generate(model=SMALL, prompt=case["prompt"], raw=True, stream=True, options={"temperature": 0, "num_predict": 16})
    )


def test_openai_streaming_with_usage(ai):
    stream = ai.chat.completions.create(
        model=SMALL, max_tokens=6, seed=3, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello"}],
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert any(c.choices and c.choices[0].delta.content for c in chunks)


def test_openai_completions_and_models(ai):
    r = ai.completions.create(model=SMALL, prompt="def add(a, b):", max_tokens=5, temperature=0)
    assert r.choices[0].text
    ids = [m.id for m in ai.models.list().data]
    assert ids == [SMALL, LARGE, "auto", EMBED]
    assert ai.models.retrieve(LARGE).id == LARGE


def test_openai_errors_raise_client_exceptions(ai):
    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        ai.chat.completions.create(model=SMALL, messages=[])
