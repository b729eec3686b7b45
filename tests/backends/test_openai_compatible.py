"""OpenAICompatible against a real HTTP server on 127.0.0.1 (SSE streaming, usage)."""

from __future__ import annotations

import asyncio

import pytest
from openai_server import PROMPT_TOKENS, REPLY_WORDS

from tokenguard import Budget, Guard
from tokenguard.backends import BackendError, OpenAICompatible
from tokenguard.backends.sse import iter_sse_data
from tokenguard.tokens import get_tokenizer

TOK = get_tokenizer("gpt-4o")
FREE = {"endless": (0, 0), "fail": (0, 0), "break": (0, 0)}  # the test server's pseudo-models


def test_stream_reads_sse_and_final_usage(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "gpt-4o", api_key="sk-test")
    chunks = list(backend.stream([{"role": "user", "content": "hi"}], {"max_tokens": 100, "temperature": 0}))
    assert "".join(c.text for c in chunks) == "".join(REPLY_WORDS)
    assert chunks[-1].usage.input_tokens == PROMPT_TOKENS
    assert chunks[-1].usage.cached_input_tokens == 10
    request = openai_server.requests[-1]
    assert request["body"]["stream"] is True
    assert request["body"]["stream_options"] == {"include_usage": True}
    assert request["body"]["max_tokens"] == 100 and request["body"]["temperature"] == 0
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert backend.tokenizer().name  # gpt-4o is known offline


def test_guard_reports_the_servers_usage(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "gpt-4o"), max_output_tokens=100)
    reply = guard.complete("hi", user="u")
    assert reply.text == "".join(REPLY_WORDS) and reply.stop_reason == "stop"
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (
        PROMPT_TOKENS, len(REPLY_WORDS), 10,
    )
    assert reply.usage.cost_usd > 0
    row = guard.ledger.records()[0]
    assert row["backend"] == "openai" and row["model"] == "gpt-4o"


def test_server_side_length_and_max_completion_tokens(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "gpt-4o", max_tokens_param="max_completion_tokens")
    Guard(backend, max_output_tokens=3).complete("hi")
    assert openai_server.requests[-1]["body"]["max_completion_tokens"] == 3
    reply = Guard(OpenAICompatible(openai_server.base_url, "gpt-4o"), max_output_tokens=3).complete("hi")
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 3


def test_guard_cuts_a_server_that_ignores_max_tokens(openai_server):
    budget = Budget(tokens=1_000)
    backend = OpenAICompatible(openai_server.base_url, "endless", tokenizer="gpt-4o")
    guard = Guard(backend, max_output_tokens=25, budget=budget, prices=FREE)
    reply = guard.complete("go")  # the server would stream forever
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 25
    assert reply.usage.input_tokens == TOK.count_messages(reply.messages)  # our exact count
    assert budget.spent()["tokens"] == reply.usage.total_tokens
    guard.backend.close()


def test_http_error_is_raised_and_metered(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "fail", tokenizer="gpt-4o")
    guard = Guard(backend, budget=Budget(tokens=10_000), prices=FREE)
    with pytest.raises(BackendError) as info:
        guard.complete("hi")
    assert info.value.status == 500 and "model exploded" in str(info.value)
    row = guard.ledger.records()[0]
    assert row["stop_reason"] == "error" and row["input_tokens"] == 0
    assert guard.budgets[0].spent()["reserved_tokens"] == 0


def test_broken_stream_keeps_what_was_seen(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "break", tokenizer="gpt-4o"), prices=FREE)
    stream = guard.stream("hi")
    pieces = []
    with pytest.raises(BackendError, match="before it finished"):
        for piece in stream:
            pieces.append(piece)
    # The server hung up without [DONE]; whatever arrived is metered.
    row = guard.ledger.records()[0]
    assert row["stop_reason"] == "error"
    assert pieces and row["output_tokens"] == TOK.count("".join(pieces))


def test_async_stream(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "gpt-4o"))

    async def run():
        s = guard.astream("hi")
        pieces = [p async for p in s]
        r2 = await guard.acomplete("again")
        return pieces, s.reply, r2

    pieces, reply, again = asyncio.run(run())
    assert "".join(pieces) == reply.text == "".join(REPLY_WORDS)
    assert reply.usage.input_tokens == PROMPT_TOKENS and again.usage.output_tokens == len(REPLY_WORDS)


def test_sse_decoder_rules():
    lines = [": comment", "event: message", "data: {\"a\":", "data: 1}", "", "data: [DONE]", ""]
    assert list(iter_sse_data(lines)) == ['{"a":\n1}', "[DONE]"]
    assert list(iter_sse_data(["data:x"])) == ["x"]


def test_unknown_model_tokenizer_asks_for_one(openai_server):
    from tokenguard.errors import UnknownTokenizer

    guard = Guard(OpenAICompatible(openai_server.base_url, "llama3-house"))
    with pytest.raises(UnknownTokenizer, match="tokenizer="):
        guard.complete("hi")
    assert openai_server.requests == []  # refused before anything was sent
