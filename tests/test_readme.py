"""The README's Python examples run as written: the ones that call a server run
against a real OpenAI-compatible server on 127.0.0.1 (its address put in place of the
README's), with `client` the official OpenAI client pointed at it; the ones on the
bundled model are slow."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
from backends.openai_server import OpenAIServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
README_URL = "http://127.0.0.1:8000/v1"
# The multi-host example's addresses: its upstream becomes the local server, its Redis
# the tests' throwaway redis-server.
UPSTREAM_URL = "http://llm.internal:8000/v1"
REDIS_URL = "redis://redis.internal:6379/0?prefix=acme:"


def _bundled(block: str) -> bool:
    """Whether a block runs the bundled model (no backend named, or the runner itself)."""
    return "LlamaRunner()" in block or "tg.Guard(max_output_tokens" in block


def _run(block: str, server_url: str, redis_url: str | None = None) -> dict:
    namespace = {"client": openai.OpenAI(base_url=server_url, api_key="sk-readme")}
    block = block.replace(README_URL, server_url).replace(UPSTREAM_URL, server_url)
    if redis_url is not None:
        block = block.replace(REDIS_URL, redis_url)
    exec("import tokenguard as tg\n" + block, namespace)
    return namespace


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 4 and any(README_URL in b for b in BLOCKS)


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if not _bundled(b)])
def test_a_readme_example_runs_as_written(index, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # the examples write budget.sqlite and usage.sqlite
    redis_url = request.getfixturevalue("redis_url") if REDIS_URL in BLOCKS[index] else None
    with OpenAIServer() as server:
        namespace = _run(BLOCKS[index], server.base_url, redis_url)
    if "completion" in namespace:
        assert namespace["tg"].reply_of(namespace["completion"]).stop_reason == "stop"
    if "reply" in namespace:
        assert namespace["reply"].usage.input_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if _bundled(b)])
def test_a_readme_example_on_the_bundled_model_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run(BLOCKS[index], "http://127.0.0.1:9/v1")
    if "reply" in namespace:
        assert namespace["reply"].stop_reason == "repetition"
