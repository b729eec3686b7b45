"""@guard around existing model calls: strings, completions, chunk streams; sync and async."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tokenguard import Budget, Reply, guard
from tokenguard.errors import BudgetExceeded, ConfigError, InputTooLong
from tokenguard.tokens import get_tokenizer

TOK = get_tokenizer("gpt-4o")


def test_a_prompt_string_reaches_the_function_as_messages():
    seen = []

    @guard(model="gpt-4o", max_output_tokens=64)
    def ask(messages):
        seen.append(messages)
        return "Paris"

    reply = ask("Capital of France?", user="ada", tags=["geo"])
    assert isinstance(reply, Reply) and reply.text == "Paris"
    # As everywhere in the guard: a prompt string is one user message (a function written
    # for an OpenAI client would fail on a bare string).
    assert seen == [[{"role": "user", "content": "Capital of France?"}]]
    assert reply.usage.input_tokens == TOK.count_messages(reply.messages)
    row = ask.guard.ledger.records()[0]
    assert row["user"] == "ada" and row["tags"] == ["geo"]
    assert ask.__name__ == "ask"


def test_a_bare_decorator_cannot_know_the_model():
    with pytest.raises(ConfigError, match="pass model="):

        @guard
        def ask(messages):
            return "x"


def test_extra_arguments_reach_the_function():
    @guard(model="gpt-4o")
    def ask(messages, style, *, temperature=0.0):
        return f"{style}:{temperature}:{messages[-1]['content']}"

    reply = ask([{"role": "user", "content": "hi"}], "terse", temperature=0.5)
    assert reply.text == "terse:0.5:hi"


def test_openai_completion_object_with_usage():
    def create(messages):
        return SimpleNamespace(
            choices=[SimpleNamespace(message=SimpleNamespace(content="Hello"), finish_reason="stop")],
            usage=SimpleNamespace(prompt_tokens=12, completion_tokens=1, prompt_tokens_details=None),
        )

    ask = guard(model="gpt-4o")(create)
    reply = ask([{"role": "user", "content": "hi"}])
    assert reply.text == "Hello" and (reply.usage.input_tokens, reply.usage.output_tokens) == (12, 1)


def test_function_returning_a_chunk_iterator_is_consumed_and_capped():
    def create(messages):
        return ({"choices": [{"delta": {"content": "word "}, "finish_reason": None}]} for _ in range(1000))

    ask = guard(model="gpt-4o", max_output_tokens=8)(create)
    reply = ask("go")
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 8


def test_generator_function_returns_a_guarded_stream():
    @guard(model="gpt-4o")
    def ask(messages):
        yield "a"
        yield "b"

    stream = ask("hi")
    assert list(stream) == ["a", "b"] and stream.reply.text == "ab"


def test_async_function_and_async_generator():
    @guard(model="gpt-4o")
    async def ask(messages):
        return "async"

    @guard(model="gpt-4o")
    async def stream(messages):
        yield "x"
        yield "y"

    async def run():
        reply = await ask("hi")
        s = stream("hi")
        return reply, [p async for p in s], s.reply

    reply, pieces, final = asyncio.run(run())
    assert reply.text == "async" and pieces == ["x", "y"] and final.text == "xy"


def test_decorator_enforces_input_cap_and_budget_before_calling():
    calls = []

    @guard(model="gpt-4o", max_input_tokens=20, max_output_tokens=10, budget=Budget(tokens=60))
    def ask(messages, max_tokens):
        calls.append(messages)
        return "ok"

    with pytest.raises(InputTooLong):
        ask("long " * 100)
    ask("hi")
    ask("hi")
    with pytest.raises(BudgetExceeded):
        for _ in range(10):
            ask("hi")
    assert len(calls) < 10
    rows = ask.guard.ledger.records()
    assert rows[0]["stop_reason"] == "input_too_long" and rows[-1]["stop_reason"] == "budget_exceeded"


def test_with_a_budget_the_function_must_take_the_output_cap():
    with pytest.raises(ConfigError, match="takes no max_tokens"):

        @guard(model="gpt-4o", max_output_tokens=5, budget=Budget(tokens=200))
        def ask(messages):
            return "a reply the server made as long as it liked"

    handed = []

    @guard(model="gpt-4o", max_output_tokens=5, budget=Budget(tokens=200))
    def capped(messages, max_tokens):
        handed.append(max_tokens)
        return "ok"

    capped("hi")
    capped("hi", max_tokens=3)
    assert handed == [5, 3]


def test_decorator_takes_no_backend():
    with pytest.raises(ConfigError):
        guard(backend=object())
