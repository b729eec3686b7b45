"""The bundled-runner backend adapter, on the real bundled model."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from tokenguard import Guard, InvalidRequest
from tokenguard.backends import BundledRunner
from tokenguard.tokens import DEFAULT_MODEL_NAME, get_tokenizer

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def test_tokenizer_without_loading_the_weights():
    backend = BundledRunner()
    assert backend.tokenizer().count_messages(MESSAGES) == get_tokenizer(DEFAULT_MODEL_NAME).count_messages(MESSAGES)
    assert backend._runner is None


@pytest.mark.slow
def test_guard_meters_what_the_runner_read_and_wrote(bundled_runner):
    guard = Guard(BundledRunner(bundled_runner), max_output_tokens=8)
    reply = guard.complete(MESSAGES, temperature=0.0)
    direct = bundled_runner.chat(MESSAGES, max_tokens=8)
    assert reply.text == direct.text
    assert reply.stop_reason == direct.finish_reason
    assert reply.usage.input_tokens == direct.prompt_tokens == guard.tokenizer.count_messages(MESSAGES)
    assert reply.usage.output_tokens == direct.completion_tokens <= 8
    assert reply.usage.cost_usd == 0.0  # the bundled model is free
    assert asyncio.run(guard.acomplete(MESSAGES)).text == direct.text
    streamed = guard.stream(MESSAGES)
    assert "".join(streamed) == direct.text and streamed.reply.usage.output_tokens == direct.completion_tokens
    assert [r["output_tokens"] for r in guard.ledger.records()] == [direct.completion_tokens] * 3


@pytest.mark.slow
def test_abandoned_stream_frees_the_runner_and_is_metered(bundled_runner):
    guard = Guard(BundledRunner(bundled_runner), max_output_tokens=64)
    stream = guard.stream([{"role": "user", "content": "Count from one to fifty in words."}])
    next(iter(stream))
    stream.close()
    stats = bundled_runner.stats()
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    row = guard.ledger.records()[-1]
    assert row["stop_reason"] in ("cancelled", "length", "stop") and row["output_tokens"] >= 1


@pytest.mark.slow
def test_guard_chat_sessions_reuse_the_runners_kv(bundled_runner):
    guard = Guard(BundledRunner(bundled_runner), max_output_tokens=12)
    guard.chat("Name a color.", session="colors")
    second = guard.chat("Name another one.", session="colors")
    assert second.usage.cached_input_tokens > 0  # turn 2 prefilled only what was new
    assert guard.ledger.records()[-1]["cached_input_tokens"] == second.usage.cached_input_tokens
    # A turn closed after its first piece is metered with what the KV covered all the same.
    third = guard.chat_stream("And one more?", session="colors")
    next(iter(third))
    third.close()
    row = guard.ledger.records()[-1]
    assert row["stop_reason"] == "cancelled" and row["cached_input_tokens"] > second.usage.cached_input_tokens
    assert row["input_tokens"] == guard.tokenizer.count_messages(third.reply.messages)
    bundled_runner.end_session("colors")


@pytest.mark.slow
def test_warmup_loads_the_bundled_model_once_and_logs_it(caplog, default_gguf):
    caplog.set_level(logging.INFO, logger="tokenguard")
    backend = BundledRunner(kv_cache_bytes=64 << 20)  # a fresh load, with a small KV pool
    backend.warmup()
    runner = backend.runner
    try:
        backend.warmup()  # loaded: returns at once
        assert backend.runner is runner
        info = [r.getMessage() for r in caplog.records if r.name.startswith("tokenguard.")]
        assert info[0] == f"loading model {default_gguf} (gguf, {runner.precision.name} on {runner.device})"
        assert re.fullmatch(rf"loaded {default_gguf.name} in \d+\.\d s \(134\.5 M parameters, 98\.4 MB on disk\)",
                            info[1])
        assert len(info) == 2
    finally:
        runner.close()


@pytest.mark.slow
def test_close_leaves_a_runner_passed_in_to_its_owner(bundled_runner):
    backend = BundledRunner(bundled_runner)
    with Guard(backend, max_output_tokens=2) as guard:
        guard.complete("Hi")
    assert backend.runner is bundled_runner and bundled_runner.stats()["running"] == 0
    assert bundled_runner.generate("Hi", max_tokens=1).token_ids  # still serving



def test_a_parameter_the_runner_cannot_take_is_refused_before_it_loads():
    guard = Guard(BundledRunner(), max_output_tokens=4)
    for params in ({"foo": 1}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        with pytest.raises(InvalidRequest, match="the bundled runner does not take"):
            guard.complete("hi", **params)
    assert guard.backend._runner is None  # refused before the model loaded
