"""What every compat test shares: the server's address, the model names, the clients."""

import os
import pathlib

import ollama
import openai
import pytest

BASE = os.environ.get("DUET_URL", "http://127.0.0.1:11434")
SMALL = "qwen2.5-coder:0.5b"
LARGE = "qwen2.5-coder:1.5b"
EMBED = "all-minilm"
VECTORS = pathlib.Path(__file__).resolve().parent.parent / "vectors"


@pytest.fixture(scope="session")
def oc():
    return ollama.Client(host=BASE)


@pytest.fixture(scope="session")
def ai():
    return openai.OpenAI(base_url=BASE + "/v1", api_key="duet")
