"""The Function backend: what it hands the function and how it reads what comes back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from tokenguard.backends import Chunk, Function
from tokenguard.errors import InvalidRequest


def _run(backend, params=None):
    return list(backend.stream([{"role": "user", "content": "hi"}], params or {"max_tokens": 5}))


def test_max_tokens_only_when_accepted():
    seen = {}

    def with_kw(messages, *, max_tokens, temperature=1.0):
        seen.update(max_tokens=max_tokens, temperature=temperature)
        return "a"

    def with_var_kw(messages, **kw):
        seen.update(kw)
        return "b"

    assert _run(Function(with_kw), {"max_tokens": 5, "temperature": 0.1}) == [Chunk("a", finish_reason="stop")]
    assert seen == {"max_tokens": 5, "temperature": 0.1}
    assert _run(Function(with_var_kw), {"max_tokens": 9})[0].text == "b" and seen["max_tokens"] == 9
    assert _run(Function(lambda messages: "c"))[0].text == "c"


def test_bind_adds_positional_arguments():
    backend = Function(lambda messages, a, b: f"{a}{b}")
    assert _run(backend.bind(1, 2))[0].text == "12"
    assert backend._args == ()


def test_iterators_of_strings_and_chunks():
    chunks = _run(Function(lambda m: iter(["x", {"choices": [{"delta": {"content": "y"}, "finish_reason": "stop"}]}])))
    assert [c.text for c in chunks] == ["x", "y"] and chunks[-1].finish_reason == "stop"


def test_bad_return_type():
    with pytest.raises(TypeError, match="must return"):
        _run(Function(lambda m: 42))
    # Iterable, but no stream: iterating would meter a dict's keys (or bytes' numbers) as the answer.
    anthropic_shape = {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"text": "hi"}]}
    with pytest.raises(InvalidRequest, match=r"got a dict that is none of these \(a dict without 'choices'\)"):
        _run(Function(lambda m: anthropic_shape))
    with pytest.raises(InvalidRequest, match="got a bytes that is none of these"):
        _run(Function(lambda m: b"hi"))
    with pytest.raises(TypeError):
        Function("not a function")


def test_async_detection_and_astream():
    async def coro(messages, max_tokens):
        return "z"

    class AsyncCallableObject:
        async def __call__(self, messages):
            return "w"

    assert Function(coro).is_async and Function(AsyncCallableObject()).is_async

    async def collect(backend):
        return [c.text async for c in backend.astream([], {"max_tokens": 1})]

    assert asyncio.run(collect(Function(coro))) == ["z"]
    assert asyncio.run(collect(Function(AsyncCallableObject()))) == ["w"]
    assert asyncio.run(collect(Function(lambda m: iter(["s", "t"])))) == ["s", "t"]


def test_a_function_s_cache_identity_is_the_same_in_every_process():
    # A persistent cache is shared between processes: nested code, set constants and
    # closures (an object in one too) must not make a function look different in each.
    script = textwrap.dedent("""
        import types
        from tokenguard.backends import Function
        def make(persona):
            client = types.SimpleNamespace(base_url="http://127.0.0.1:8000/v1")  # an object: by its type
            def answers(messages, max_tokens):
                if messages[-1]["role"] in {"user", "system", "tool", "developer"}:
                    return persona + " ".join([w.upper() for w in messages[-1]["content"].split()]) + str(client)
                return (lambda text: text)("?")
            return answers
        print(Function(make("pirate")).cache_identity(), Function(make("robot")).cache_identity())
    """)
    seen = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(seen) == 1
    pirate, robot = seen.pop().split("] [")
    assert pirate != robot
