"""LlamaRunner end to end on the tiny random-weight Llama and its byte-level tokenizer:
result fields, sampling controls, stop strings, streaming and cancellation."""

from __future__ import annotations

import asyncio

import pytest

import tokenguard as tg
from tokenguard.errors import InputTooLong
from tokenguard.runner import GenerationResult, LlamaRunner, TextStream

EOS = 257  # <|im_end|> in the tiny vocabulary


@pytest.fixture(scope="module")
def runner(tiny_llama):
    runner = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32")
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def gguf_runner(tiny_llama):
    runner = LlamaRunner(tiny_llama.gguf_path, device="cpu", dtype="float32")
    yield runner
    runner.close()


def test_generate_result_fields(runner):
    r = runner.generate("hello world", max_tokens=12)
    assert isinstance(r, GenerationResult)
    assert r.prompt_tokens == len(b"hello world")  # one byte token each
    assert r.cached_prompt_tokens == 0
    assert r.finish_reason in ("stop", "length")
    assert 1 <= len(r.token_ids) <= 12 and r.completion_tokens == len(r.token_ids)
    if r.finish_reason == "length":
        assert len(r.token_ids) == 12


def test_max_tokens_gives_length(runner):
    r = runner.generate([10, 20, 30, 40], max_tokens=5)
    if EOS not in r.token_ids:
        assert r.finish_reason == "length" and len(r.token_ids) == 5


def test_gguf_and_safetensors_generate_the_same_tokens(runner, gguf_runner):
    for prompt in ("abc", "The quick brown fox", [1, 2, 3, 250]):
        assert runner.generate(prompt, max_tokens=16).token_ids == gguf_runner.generate(prompt, max_tokens=16).token_ids


def test_token_id_prompt_is_used_as_given(runner):
    ids = [104, 105, 33]  # "hi!" as byte tokens
    assert runner.generate(ids, max_tokens=8).token_ids == runner.generate("hi!", max_tokens=8).token_ids
    with pytest.raises(ValueError):
        runner.generate([999999])


def test_seeded_sampling_reproduces(runner):
    kw = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "seed": 11}
    a = runner.generate("seed test", **kw)
    b = runner.generate("seed test", **kw)
    c = runner.generate("seed test", **(kw | {"seed": 12}))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_equals_greedy(runner):
    greedy = runner.generate("top k", max_tokens=16)
    sampled = runner.generate("top k", max_tokens=16, temperature=2.0, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_repetition_penalty_changes_output(runner):
    plain = runner.generate("aaaa", max_tokens=24)
    penalized = runner.generate("aaaa", max_tokens=24, repetition_penalty=5.0)
    assert plain.token_ids != penalized.token_ids


def test_stop_string_truncates_text(runner):
    full = runner.generate("stop here", max_tokens=40)
    text = full.text
    # a stop string from the middle of the greedy text, made of clean characters
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    r = runner.generate("stop here", max_tokens=40, stop=[stop, "never-appears"])
    assert r.finish_reason == "stop"
    assert r.text == text[: text.index(stop)]
    assert r.token_ids == full.token_ids[: len(r.token_ids)]
    assert len(r.token_ids) < len(full.token_ids)


def test_stream_pieces_join_to_generate_text(runner):
    for kw in ({"max_tokens": 30}, {"max_tokens": 30, "temperature": 0.9, "seed": 5}):
        stream = runner.stream("stream me", **kw)
        assert isinstance(stream, TextStream)
        pieces = list(stream)
        result = runner.generate("stream me", **kw)
        assert "".join(pieces) == result.text
        assert stream.result is not None and stream.result.token_ids == result.token_ids


def test_stream_with_stop_string_never_leaks_it(runner):
    text = runner.generate("leak", max_tokens=40).text
    start = next(i for i in range(3, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    pieces = list(runner.stream("leak", max_tokens=40, stop=stop))
    assert "".join(pieces) == text[: text.index(stop)]
    assert "" not in pieces  # no empty piece at the end either

    async def astream():
        return [piece async for piece in runner.astream("leak", max_tokens=40, stop=stop)]

    assert asyncio.run(astream()) == pieces
    # A consumer that leaves at the stop string's piece has still freed the sequence.
    for _ in runner.stream("leak", max_tokens=200, stop=stop):
        break
    stats = runner.stats()
    assert stats["running"] == stats["waiting"] == 0


def test_closing_a_stream_stops_the_model(runner):
    # Once close() returns, the engine (in its process) holds and schedules nothing of the
    # stream; test_engine.py counts the model's forwards on an Engine in this process.
    stream = runner.stream([1, 2, 3], max_tokens=200)
    for got, _ in enumerate(stream, start=1):
        if got == 3:
            break
    stream.close()
    stats = runner.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert list(stream) == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_dropped_before_it_is_read_stops_the_model(runner, kind):
    import gc

    def drop(make):
        stream = make([1, 2, 3], max_tokens=200)
        del stream
        gc.collect()

    async def adrop():
        drop(runner.astream)

    drop(runner.stream) if kind == "sync" else asyncio.run(adrop())
    stats = runner.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_stream_context_manager_closes(runner):
    with runner.stream("ctx", max_tokens=50) as stream:
        next(stream)
    assert list(stream) == []


def test_stop_token_ends_generation_with_reason_stop(runner):
    assert EOS in runner.stop_token_ids  # the tokenizer's EOS
    greedy = runner.generate("anything", max_tokens=10).token_ids
    # Make the 4th greedy token an end-of-turn token: the reply ends there, its text excluded.
    tokenizers_own = runner.stop_token_ids
    runner.stop_token_ids = frozenset({greedy[3]})
    try:
        r = runner.generate("anything", max_tokens=10)
    finally:
        runner.stop_token_ids = tokenizers_own
    assert r.token_ids == greedy[:4] and r.finish_reason == "stop"
    assert r.text == runner.tokenizer.decode(greedy[:3])


def test_chat_uses_the_chat_template(runner):
    messages = [{"role": "user", "content": "hi"}]
    r = runner.chat(messages, max_tokens=4)
    assert r.prompt_tokens == len(runner.tokenizer.encode_chat(messages)) == runner.tokenizer.count_messages(messages)
    assert "".join(runner.stream(messages=messages, max_tokens=4)) == r.text


def test_context_window_limits(runner):
    ctx = runner.context_length
    with pytest.raises(InputTooLong):
        runner.generate([65] * ctx)
    r = runner.generate([65] * (ctx - 3), max_tokens=50)
    assert len(r.token_ids) <= 3
    with pytest.raises(ValueError):
        runner.generate([])


@pytest.mark.parametrize("mode", ["bfloat16", "float16", "int8", "int4"])
def test_every_precision_mode_generates(tiny_llama, mode):
    runner = LlamaRunner(tiny_llama.gguf_q_path, device="cpu", dtype=mode)
    try:
        assert runner.precision.name == mode
        r = runner.generate("modes", max_tokens=8)
        assert 1 <= len(r.token_ids) <= 8
    finally:
        runner.close()


def test_a_runner_passed_in_names_its_own_model(tiny_llama):
    with LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32") as runner:
        guard = tg.Guard(runner, prices={runner.tokenizer.name: (1.0, 2.0)})
        assert guard.model == runner.tokenizer.name != "SmolLM2-135M-Instruct"
        reply = guard.complete("hello", max_tokens=2)
        (row,) = guard.ledger.records()
        assert row["model"] == guard.model and reply.usage.cost_usd is not None and reply.usage.cost_usd > 0


def test_a_guard_keeps_the_runner_s_session_kv_as_long_as_the_history(tiny_llama):
    import time

    assert tg.Guard(session_ttl_s=123.0).backend._options["session_ttl_s"] == 123.0  # the runner it builds
    assert tg.Guard(history=tg.context.SessionHistory(ttl_s=86400)).backend._options["session_ttl_s"] == 86400
    assert tg.Guard(session_ttl_s=None).backend._options["session_ttl_s"] > 10**8  # a history that never expires
    with pytest.raises(tg.ConfigError, match="SessionHistory"):
        tg.Guard(history=tg.context.SessionHistory(), session_ttl_s=5)
    with LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", session_ttl_s=2.0) as runner:
        guard = tg.Guard(runner, max_output_tokens=4, prices={runner.tokenizer.name: (0.0, 0.0)})
        guard.chat("hello there", session="s")
        deadline = time.monotonic() + 3.0  # past the runner's TTL, with heartbeats
        while time.monotonic() < deadline:
            assert guard.touch("s")
            time.sleep(0.3)
        assert runner.stats()["sessions"] == 1
        assert guard.chat("and again", session="s").usage.cached_input_tokens > 0
