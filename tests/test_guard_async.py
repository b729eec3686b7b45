"""Guard, async: acomplete, achat, astream with sync and async backends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

from tokenguard import Budget, Guard, InputTooLong
from tokenguard.backends import Backend, Chunk
from tokenguard.errors import BudgetExceeded
from tokenguard.tokens import get_tokenizer

TOK = get_tokenizer("gpt-4o")


async def async_reply(messages, *, max_tokens):
    await asyncio.sleep(0)
    return "async hello"


async def async_pieces(messages, *, max_tokens):
    for piece in ["a", "sync ", "stream"]:
        await asyncio.sleep(0)
        yield piece


def test_acomplete_with_an_async_function():
    guard = Guard(async_reply, model="gpt-4o")
    reply = asyncio.run(guard.acomplete("hi", user="u"))
    assert reply.text == "async hello" and reply.stop_reason == "stop"
    assert reply.usage.output_tokens == TOK.count("async hello")
    assert guard.ledger.records()[0]["user"] == "u"


def test_astream_with_an_async_generator():
    guard = Guard(async_pieces, model="gpt-4o")

    async def run():
        stream = guard.astream("hi")
        pieces = [p async for p in stream]
        return pieces, stream.reply

    pieces, reply = asyncio.run(run())
    assert pieces == ["a", "sync ", "stream"] and reply.text == "async stream"


def test_async_api_over_a_sync_function_runs_it_off_the_loop():
    guard = Guard(lambda messages, max_tokens: iter(["x", "y"]), model="gpt-4o")
    assert asyncio.run(guard.acomplete("hi")).text == "xy"


def test_sync_api_over_an_async_function():
    assert Guard(async_pieces, model="gpt-4o").complete("hi").text == "async stream"
    assert Guard(async_reply, model="gpt-4o").complete("hi").text == "async hello"


def test_async_output_cap_closes_the_backend():
    state = {"closed": False}

    async def endless(messages, *, max_tokens):
        try:
            while True:
                await asyncio.sleep(0)
                yield "word "
        finally:
            state["closed"] = True

    guard = Guard(endless, model="gpt-4o", max_output_tokens=10)
    reply = asyncio.run(guard.acomplete("go"))
    assert state["closed"] and reply.stop_reason == "length" and reply.usage.output_tokens == 10


def test_achat_and_async_budgets():
    budget = Budget(tokens=10_000, per="session")
    guard = Guard(async_reply, model="gpt-4o", budget=budget, max_output_tokens=50)

    async def run():
        await guard.achat("one", session="s")
        return await guard.achat("two", session="s")

    reply = asyncio.run(run())
    assert [m["content"] for m in reply.messages] == ["one", "async hello", "two"]
    assert budget.spent(session="s")["tokens"] == sum(
        r["input_tokens"] + r["output_tokens"] for r in guard.ledger.records()
    )
    small = Guard(async_reply, model="gpt-4o", budget=Budget(tokens=10), max_output_tokens=50)
    with pytest.raises(BudgetExceeded):
        asyncio.run(small.acomplete("hi"))


def test_async_cancellation_is_metered():
    async def slow(messages, *, max_tokens):
        yield "first "
        await asyncio.sleep(10)
        yield "never"

    budget = Budget(tokens=10_000)
    guard = Guard(slow, model="gpt-4o", budget=budget)

    async def run():
        task = asyncio.create_task(guard.acomplete("hi"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "cancelled" and row["output_tokens"] == TOK.count("first ")
    assert budget.spent()["reserved_tokens"] == 0
    assert budget.spent()["tokens"] == row["input_tokens"] + row["output_tokens"]


def test_async_stream_aclose():
    guard = Guard(async_pieces, model="gpt-4o")

    async def run():
        async with guard.astream("hi") as stream:
            first = await anext(stream)
        return first, stream.reply

    first, reply = asyncio.run(run())
    assert first == "a" and reply.stop_reason == "cancelled"


class LoadsSlowly(Backend):
    """A backend whose first use loads something (as the bundled model does); it
    records which thread did the loading."""

    name = "slow-loader"
    model = "gpt-4o"

    def __init__(self) -> None:
        self.warmed_on: list[int] = []

    def warmup(self) -> None:
        self.warmed_on.append(threading.get_ident())

    def stream(self, messages, params):
        yield Chunk(text="ok", finish_reason="stop")

    async def astream(self, messages, params):
        yield Chunk(text="ok", finish_reason="stop")


class RecordingBudget(Budget):
    """A real budget that records the threads its reservations ran on."""

    threads: list[int]

    def reserve(self, *args, **kwargs):
        self.threads.append(threading.get_ident())
        return super().reserve(*args, **kwargs)


def test_nothing_blocking_runs_on_the_event_loop(tmp_path):
    backend = LoadsSlowly()
    budget = RecordingBudget(tokens=10_000, store=tmp_path / "budget.sqlite")
    budget.threads = []
    guard = Guard(backend, budget=budget, ledger=tmp_path / "ledger.sqlite")

    async def run():
        loop_thread = threading.get_ident()
        replies = [await guard.acomplete("hi"), await guard.achat("hi", session="s")]
        replies.append(await guard.astream("hi").aread())
        return loop_thread, replies

    loop_thread, replies = asyncio.run(run())
    assert [r.text for r in replies] == ["ok"] * 3
    assert len(backend.warmed_on) == 3 and loop_thread not in backend.warmed_on  # loading: off the loop
    assert len(budget.threads) == 3 and loop_thread not in budget.threads  # SQLite reservations: off the loop
    assert len(guard.ledger) == 3


def test_a_refusal_surfaces_at_the_first_iteration_of_an_async_stream():
    guard = Guard(async_pieces, model="gpt-4o", max_input_tokens=5)

    async def run():
        stream = guard.astream("word " * 50)  # nothing runs yet
        with pytest.raises(InputTooLong):
            await anext(stream)

    asyncio.run(run())
    assert guard.ledger.records()[0]["stop_reason"] == "input_too_long"


class _SlowToOpen(Backend):
    """Answers "ok"; its warm-up (run while a call opens) waits until the test lets it go."""

    name = "slow-to-open"
    model = "gpt-4o"

    def __init__(self) -> None:
        self.opening = threading.Event()
        self.gate = threading.Event()

    def warmup(self) -> None:
        self.opening.set()
        self.gate.wait(10)

    def stream(self, messages, params):
        yield Chunk(text="ok", finish_reason="stop")

    async def astream(self, messages, params):
        yield Chunk(text="ok", finish_reason="stop")


def test_a_caller_cancelled_while_its_call_opens_still_ends_the_call():
    backend = _SlowToOpen()
    budget = Budget(tokens=1_000, per="user")
    guard = Guard(backend, budget=budget)

    async def main():
        task = asyncio.create_task(guard.astream("hi", user="ann").aread())
        await asyncio.to_thread(backend.opening.wait, 10)
        task.cancel()  # while the call is being opened in its worker thread
        with pytest.raises(asyncio.CancelledError):
            await task
        backend.gate.set()
        for _ in range(500):  # the opening goes on; what it opened is then ended
            if guard.ledger.records():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    rows = guard.ledger.records()
    assert len(rows) == 1 and rows[0]["stop_reason"] == "cancelled"
    assert budget.spent(user="ann")["reserved_tokens"] == 0  # the hold was released, not left


def test_steps_run_on_the_event_loop_only_when_none_of_them_can_wait(tmp_path):
    ran_on: list[str] = []
    loop_thread: list[threading.Thread] = []

    def observer(call, row, error):  # the meter step's observers run where the steps run
        ran_on.append("loop" if threading.current_thread() in loop_thread else "worker")

    in_memory = Guard(async_reply, model="gpt-4o", budget=Budget(tokens=100_000, per="user"))
    on_disk = Guard(async_reply, model="gpt-4o", ledger=tmp_path / "ledger.sqlite")
    tight = Guard(async_reply, model="gpt-4o", budget=Budget(tokens=40, per="user"), max_output_tokens=4)
    for guard in (in_memory, on_disk, tight):
        guard.meter.observers.append(observer)

    async def calls(guard: Guard, *prompts: str) -> list[str]:
        ran_on.clear()
        for prompt in prompts:
            await guard.acomplete(prompt, user="ann")
        return list(ran_on)

    async def run() -> None:
        loop_thread.append(threading.current_thread())
        # The first call loads what the guard needs in a worker thread; then in-memory
        # steps run on the loop, unless the prompt is long enough to take a while to count.
        assert await calls(in_memory, "hello", "hello again", "x " * 10_000, "bye") == [
            "worker", "loop", "worker", "loop"]
        assert await calls(on_disk, "hello", "hello again") == ["worker", "worker"]  # SQLite may wait
        await tight.acomplete("hi", user="ann")
        with pytest.raises(BudgetExceeded):  # a refusal inline is raised and metered as in a thread
            await tight.acomplete("a question far too long for what is left of the budget " * 3, user="ann")
        assert tight.ledger.records()[-1]["stop_reason"] == "budget_exceeded"
        assert tight.budgets[0].spent(user="ann")["reserved_tokens"] == 0

    asyncio.run(run())


def test_async_calls_over_a_blocking_function_run_together_not_a_pool_s_worth_at_a_time():
    # Each stream held one of the default executor's few workers (cpu + 4) for as long
    # as it ran: 12 calls over a blocking function ran 6 at a time.
    together = threading.Barrier(12)

    def blocking(messages, max_tokens):
        together.wait(timeout=30)  # every call must be running at once to pass
        yield "ok"

    guard = Guard(blocking, model="gpt-4o")

    async def all_at_once() -> list[str]:
        replies = await asyncio.gather(*[guard.acomplete(f"q{i}") for i in range(12)])
        return [reply.text for reply in replies]

    assert asyncio.run(all_at_once()) == ["ok"] * 12


def test_streams_over_a_blocking_function_never_wait_for_each_other_s_threads():
    # Each stream holds its thread while its reader awaits another guarded call on the same
    # kind of backend: with a fixed pool of 256 threads, 300 such requests all waited for ever.
    def plan(messages, max_tokens):
        for i in range(3):
            yield f"step{i} "

    guard = Guard(plan, model="gpt-4o", stop=None)

    async def request(i: int) -> int:
        done = 0
        async for piece in guard.astream(f"plan {i}"):
            await guard.acomplete(f"do {piece}")
            done += 1
        return done

    async def all_requests() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*[request(i) for i in range(300)]), timeout=120)

    assert asyncio.run(all_requests()) == [3] * 300


def test_a_hung_blocking_backend_does_not_keep_the_process_from_exiting():
    script = textwrap.dedent("""
        import asyncio, threading
        import tokenguard as tg

        def hangs(messages, max_tokens):
            threading.Event().wait()  # a read that never returns
            yield "never"

        try:
            asyncio.run(tg.Guard(hangs, model="gpt-4o", timeout=0.5).acomplete("hi"))
        except tg.BackendTimeout:
            print("timed out")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "timed out", done.stderr


def test_calls_opening_when_their_loop_closes_are_still_ended(tmp_path):
    # Fire-and-forget tasks, their loop closed while their calls opened in worker threads
    # (a SQLite ledger: the steps may wait): no row was written and the holds stayed.
    import gc
    import time

    budget = Budget(tokens=10_000, per="user")
    guard = Guard(lambda messages, max_tokens: "hi", model="gpt-4o", budget=budget, max_output_tokens=1000,
                  ledger=tmp_path / "usage.sqlite")
    guard.complete("warm up", user="w")

    async def fire_and_forget() -> None:
        for i in range(3):
            asyncio.get_running_loop().create_task(guard.acomplete(f"background {i}", user="ann"))
        await asyncio.sleep(0)  # the openings start in worker threads

    loop = asyncio.new_event_loop()
    loop.run_until_complete(fire_and_forget())
    loop.close()
    del loop
    for _ in range(100):
        gc.collect()
        if len(guard.ledger.records(user="ann")) == 3:
            break
        time.sleep(0.05)
    assert [row["stop_reason"] for row in guard.ledger.records(user="ann")] == ["cancelled"] * 3
    assert budget.spent(user="ann")["reserved_tokens"] == 0
