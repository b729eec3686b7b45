"""The serving engine behind LlamaRunner: continuous batching, paged KV, sessions.

Concurrency must not change greedy outputs; blocks must always return to the pool."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
from waiting import wait_until

from tokenguard import InputTooLong, InvalidRequest
from tokenguard.runner import KVCacheTooSmall, LlamaRunner
from tokenguard.runner.engine.engine import Engine, admission_deadline
from tokenguard.runner.engine_process import EngineRecipe
from tokenguard.runner.sampling import SamplingParams

PROMPTS = ["hello world", "The quick brown fox jumps", "a", "0123456789" * 8, "Once upon a time, in a land",
           "x" * 150, "What is 2+2?", "zzz"]


@pytest.fixture(scope="module")
def runner(tiny_llama):
    runner = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", batch_window_ms=5)
    yield runner
    runner.close()


def in_threads(fn, items):
    results = [None] * len(items)
    errors = []

    def work(i, item):
        try:
            results[i] = fn(item)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, item)) for i, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_greedy_equals_one_at_a_time(runner):
    alone = [runner.generate(p, max_tokens=24).token_ids for p in PROMPTS]
    together = in_threads(lambda p: runner.generate(p, max_tokens=24).token_ids, PROMPTS * 2)
    assert together == alone * 2
    assert runner.stats()["kv_blocks_free"] == runner.stats()["kv_blocks_total"]


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(runner):
    # The batch is sampled together; each sequence still draws from its own seeded generator.
    kinds = [{"temperature": 0.9, "seed": 7}, {"temperature": 1.2, "top_k": 20, "seed": 8},
             {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 9},
             {"repetition_penalty": 1.5}, {}]
    requests = [(p, kw) for p, kw in zip(PROMPTS, kinds * 2, strict=False)]
    alone = [runner.generate(p, max_tokens=20, **kw).token_ids for p, kw in requests]
    together = in_threads(lambda r: runner.generate(r[0], max_tokens=20, **r[1]).token_ids, requests * 2)
    assert together == alone * 2


def test_async_callers_share_the_engine(runner):
    alone = [runner.generate(p, max_tokens=16).text for p in PROMPTS[:4]]

    async def main():
        results = await asyncio.gather(*(runner.agenerate(p, max_tokens=16) for p in PROMPTS[:4]))
        chat = await runner.achat([{"role": "user", "content": "hi"}], max_tokens=8)
        pieces = [piece async for piece in runner.astream(PROMPTS[0], max_tokens=16)]
        return [r.text for r in results], chat, "".join(pieces)

    texts, chat, streamed = asyncio.run(main())
    assert texts == alone
    assert chat.text == runner.chat([{"role": "user", "content": "hi"}], max_tokens=8).text
    assert streamed == alone[0]


def test_chunked_prefill_and_mixed_batches(runner, tiny_llama):
    # A step budget of 7 tokens splits every prompt into chunks and mixes them with decodes.
    # The Engine itself, in this process: the runner's own engine (in its process) must agree.
    recipe = EngineRecipe(tiny_llama.folder, "float32", "cpu")
    engine = Engine(recipe.build_model, batch_window_ms=0, max_batched_tokens=7, kv_cache_bytes=4 << 20)
    prompts = [runner.tokenizer.encode(p) for p in PROMPTS]
    outputs = in_threads(lambda ids: _engine_generate(engine, ids, runner.stop_token_ids, 12), prompts)
    expected = [runner.generate(ids, max_tokens=12).token_ids for ids in prompts]
    assert outputs == expected
    engine.shutdown()


def test_a_cancelled_sequence_gets_no_more_forwards(tiny_llama):
    # The Engine in this process, its model hooked: cancel() returns once no step will run for it.
    model = EngineRecipe(tiny_llama.folder, "float32", "cpu").build_model()
    calls = [0]

    def count(*_):
        calls[0] += 1

    model.register_forward_hook(count)
    engine = Engine(lambda: model, batch_window_ms=0, kv_cache_bytes=4 << 20)
    events: queue.SimpleQueue = queue.SimpleQueue()
    seq = engine.submit([1, 2, 3], SamplingParams(max_tokens=200), frozenset(), events.put)
    for _ in range(3):
        assert events.get(timeout=30)[0] == "token"
    engine.cancel(seq)
    after_cancel = calls[0]
    assert after_cancel < 20  # one prefill plus a few decode steps, not 200
    assert engine.stats()["running"] == 0 and calls[0] == after_cancel
    engine.shutdown()


def _engine_generate(engine, ids, stop_ids, max_tokens):
    events = queue.SimpleQueue()
    engine.submit(ids, SamplingParams(max_tokens=max_tokens), stop_ids, events.put)
    tokens = []
    while True:
        kind, value = events.get()
        if kind == "token":
            tokens.append(value)
        elif kind == "error":
            raise value
        else:
            return tokens


def test_preemption_under_a_small_pool_keeps_outputs(tiny_llama):
    # 12 blocks of 16 slots; eight requests of ~40-110 tokens cannot all fit at once.
    small = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", batch_window_ms=20,
                        kv_cache_bytes=12 * 16 * _bytes_per_token(tiny_llama))
    assert small.stats()["kv_blocks_total"] == 12
    prompts = [("abcdefgh" * (i + 2)) for i in range(8)]
    alone = [small.generate(p, max_tokens=40).token_ids for p in prompts]
    together = in_threads(lambda p: small.generate(p, max_tokens=40).token_ids, prompts)
    assert together == alone
    assert small.stats()["preemptions"] > 0
    assert small.stats()["kv_blocks_free"] == 12
    with pytest.raises(KVCacheTooSmall, match="kv_cache_bytes"):
        small.generate("x" * 150, max_tokens=100)
    small.close()


def _bytes_per_token(tiny_llama) -> int:
    import json

    cfg = json.loads((tiny_llama.folder / "config.json").read_text())
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4


def test_second_turn_reuses_the_session_prefix(runner):
    first = [{"role": "user", "content": "Tell me about the sea."}]
    turn1 = runner.chat(first, max_tokens=20, session="sea")
    kept = runner.tokenizer.encode_chat(first) + turn1.token_ids[:-1]  # the last token is never fed
    second = [*first, {"role": "assistant", "content": turn1.text}, {"role": "user", "content": "And rivers?"}]
    prompt2 = runner.tokenizer.encode_chat(second)
    common = 0
    while common < min(len(kept), len(prompt2) - 1) and kept[common] == prompt2[common]:
        common += 1
    turn2 = runner.chat(second, max_tokens=20, session="sea")
    cold = runner.chat(second, max_tokens=20)
    assert turn2.cached_prompt_tokens == common > len(runner.tokenizer.encode_chat(first)) // 2
    assert cold.cached_prompt_tokens == 0
    assert turn2.token_ids == cold.token_ids
    stats = runner.stats()
    assert stats["sessions"] == 1 and stats["kv_blocks_free"] < stats["kv_blocks_total"]
    # Two turns of one session at once both start on its kept KV (blocks shared).
    third = [*second, {"role": "assistant", "content": turn2.text}, {"role": "user", "content": "Lakes?"}]
    both = in_threads(lambda msgs: runner.chat(msgs, max_tokens=8, session="sea"), [third, third])
    assert both[0].token_ids == both[1].token_ids == runner.chat(third, max_tokens=8).token_ids
    assert both[0].cached_prompt_tokens > turn2.cached_prompt_tokens and both[1].cached_prompt_tokens > 0
    runner.end_session("sea")
    stats = runner.stats()
    assert stats["sessions"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_closed_stream_frees_its_blocks_at_once(runner):
    total = runner.stats()["kv_blocks_total"]
    stream = runner.stream("x" * 100, max_tokens=100)
    next(stream)
    assert runner.stats()["kv_blocks_free"] < total
    stream.close()
    assert runner.stats()["kv_blocks_free"] == total
    assert runner.stats()["running"] == 0


def test_sessions_expire_after_their_ttl_unless_touched(tiny_llama):
    short = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", batch_window_ms=0, session_ttl_s=1.0)
    total = short.stats()["kv_blocks_total"]
    short.generate("keep me", max_tokens=4, session="kept")
    short.generate("drop me", max_tokens=4, session="dropped")
    for _ in range(6):  # heartbeats keep one session alive past its TTL
        time.sleep(0.25)
        assert short.touch("kept")
    assert short.stats()["sessions"] == 1
    assert not short.touch("dropped")
    assert wait_until(lambda: short.stats()["sessions"] == 0)
    assert short.stats()["kv_blocks_free"] == total
    short.close()


def test_stress_sessions_cancels_and_expiry_leak_no_blocks(tiny_llama):
    stressed = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", batch_window_ms=2,
                           session_ttl_s=0.5, kv_cache_bytes=24 * 16 * _bytes_per_token(tiny_llama))
    total = stressed.stats()["kv_blocks_total"]

    def client(i: int) -> None:
        session = f"s{i % 6}"
        for turn in range(4):
            kind = (i + turn) % 4
            if kind == 0:
                stressed.generate(f"turn {turn} of {i} " * 3, max_tokens=12, session=session)
            elif kind == 1:  # a stream abandoned midway
                with stressed.stream(f"stream {i} " * 5, max_tokens=50, session=session) as stream:
                    next(stream, None)
            elif kind == 2:
                stressed.end_session(session)
                stressed.chat([{"role": "user", "content": f"hi {i}"}], max_tokens=8, session=f"once-{i}-{turn}")
            else:

                async def go():
                    stream = stressed.astream(f"async {i}", max_tokens=30, session=session)
                    async for _ in stream:
                        break
                    await stream.aclose()

                asyncio.run(go())

    threads_before = threading.active_count()
    in_threads(client, list(range(16)))
    with pytest.raises(InputTooLong):  # a request longer than the context is refused...
        stressed.generate("far too long " * 200, max_tokens=8)
    assert stressed.generate("still fine", max_tokens=4).token_ids  # ...and the engine goes on
    assert stressed.stats()["running"] == 0 and stressed.stats()["waiting"] == 0
    assert wait_until(lambda: stressed.stats()["sessions"] == 0, timeout=15)
    assert stressed.stats()["kv_blocks_free"] == total
    stressed.close()
    # No thread outlives the work: the clients' are joined, and closing stops the engine's.
    assert wait_until(lambda: threading.active_count() < threads_before, timeout=10)


def test_admission_waits_for_company_except_at_low_load():
    window = 0.05
    # Busy with several sequences a moment ago: wait the window for others to join.
    assert admission_deadline(first_arrival=10.0, idle_since=9.99, num_waiting=1, window_s=window,
                              last_peak=8) == 10.05
    # Several waiting: batch them, even after a long idle spell.
    assert admission_deadline(first_arrival=10.0, idle_since=0.0, num_waiting=3, window_s=window,
                              last_peak=1) == 10.05
    # Idle for longer than the window and a lone request: start at once.
    assert admission_deadline(first_arrival=10.0, idle_since=5.0, num_waiting=1, window_s=window,
                              last_peak=8) == 10.0
    # A client sending one request after another (one sequence at a time): start at once.
    assert admission_deadline(first_arrival=10.0, idle_since=9.99, num_waiting=1, window_s=window,
                              last_peak=1) == 10.0


def test_stats_report_the_engine_state(runner):
    stats = runner.stats()
    for key in ("running", "waiting", "kv_blocks_total", "kv_blocks_free", "sessions", "prefix_tokens_reused"):
        assert isinstance(stats[key], int)
    assert stats["kv_blocks_total"] >= stats["kv_blocks_free"] > 0


@pytest.mark.parametrize("bad", [{"seed": 2**70, "temperature": 1.0}, {"session": ["a"]}, {"stop": [1]},
                                 {"max_tokens": float("nan")}])
def test_a_bad_request_is_refused_and_the_engine_keeps_serving(runner, bad):
    # Each of these once failed inside the engine's step and left every later call waiting.
    with pytest.raises(InvalidRequest):
        runner.generate("hello world", **{"max_tokens": 3, **bad})
    assert runner.generate("hello world", max_tokens=3).token_ids
    assert runner.stats()["waiting"] == runner.stats()["running"] == 0


def test_a_prompt_is_text_or_token_ids(runner):
    for bad in (b"hello", [504.7], None, [True]):
        with pytest.raises(InvalidRequest, match="a prompt is"):
            runner.generate(bad, max_tokens=2)
