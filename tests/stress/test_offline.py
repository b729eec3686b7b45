"""Offline: the public API works with every socket blocked, an empty tiktoken cache and
an empty home directory (no Hugging Face cache): tokenizer data and models come from
installed packages, never from the network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

BLOCK_NETWORK = textwrap.dedent("""
    import socket

    def _blocked(*args, **kwargs):
        raise OSError("the network is blocked in this test")

    socket.socket.connect = _blocked
    socket.socket.connect_ex = _blocked
    socket.create_connection = _blocked
    socket.getaddrinfo = _blocked
""")

API = textwrap.dedent("""
    import tokenguard as tg
    from tokenguard.cache import ExactCache

    for model in ("gpt-4o", "gpt-4", "SmolLM2-135M-Instruct"):
        assert tg.count_tokens("人工智能 and tokens", model=model) > 0
    tokenizer = tg.get_tokenizer("gpt-4o")
    assert tokenizer.count_until("x " * 100_000, 100) > 100
    guard = tg.Guard(lambda messages, max_tokens, **params: "ok", model="gpt-4o", cache=ExactCache(),
                     budget=tg.Budget(tokens=1_000, per="user"))
    assert guard.complete("hi", user="u", temperature=0.0).text == "ok"
    assert guard.complete("hi", user="u", temperature=0.0).cached
    assert guard.ledger.report(by="user").rows
    history = [{"role": "user", "content": f"note {i}: the code is {i}"} for i in range(60)]
    fitted = tg.context.Retrieval().fit([*history, {"role": "user", "content": "the code of note 3?"}], 120, tokenizer)
    assert tokenizer.count_messages(fitted) <= 120
    print("offline ok")
""")

BUNDLED = textwrap.dedent("""
    reply = tg.Guard(max_output_tokens=4).complete("Hello", temperature=0.0)
    assert reply.usage.output_tokens > 0
    print("bundled ok")
""")


def _run(tmp_path, code: str) -> str:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE"):
        env.pop(name, None)  # offline by design, not because a flag says so
    done = subprocess.run([sys.executable, "-c", BLOCK_NETWORK + code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(cache.iterdir()) == []  # nothing was downloaded into the tiktoken cache
    return done.stdout


def test_the_public_api_works_with_the_network_blocked(tmp_path):
    pytest.importorskip("faiss")
    assert "offline ok" in _run(tmp_path, API)


@pytest.mark.slow
def test_the_bundled_model_runs_with_the_network_blocked(tmp_path):
    assert "bundled ok" in _run(tmp_path, "import tokenguard as tg\n" + BUNDLED)
