"""Backend faults: a backend that raises, hangs past the guard's timeout, returns
malformed data or breaks its stream midway. Each time a ledger row is written, the
reservation is released, the session's history is unchanged, and the next call works."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest

import tokenguard as tg
from tokenguard import BackendError, BackendTimeout, Budget, BudgetExceeded, ConfigError, Guard, TokenGuardError
from tokenguard.errors import StoreError
from tokenguard.stores import MemoryLedgerStore

RELEASE = threading.Event()  # lets the hung backends' worker threads finish at the end


@pytest.fixture(autouse=True)
def _release_hung_backends():
    RELEASE.clear()
    yield
    RELEASE.set()


def _healthy(messages, max_tokens):
    return "fine"


def _raises(messages, max_tokens):
    raise RuntimeError("the model server fell over")


def _hangs(messages, max_tokens):
    RELEASE.wait()
    return "too late"


def _breaks_midway(messages, max_tokens):
    yield "half an ans"
    raise ConnectionResetError("connection reset by peer")


def _hangs_midway(messages, max_tokens):
    yield "first piece"
    RELEASE.wait()
    yield "never seen"


def _malformed(messages, max_tokens):
    return {"choices": "not what anyone expects"}


async def _hangs_async(messages, max_tokens):
    await asyncio.sleep(3600)
    return "too late"


FAULTS = {
    "raises": (_raises, Exception),
    "breaks midway": (_breaks_midway, Exception),
    "malformed": (_malformed, TokenGuardError),
    "hangs": (_hangs, BackendTimeout),
    "hangs midway": (_hangs_midway, BackendTimeout),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_backend_leaves_a_row_no_reservation_and_a_clean_history(fault):
    backend, expected = FAULTS[fault]
    answers = {"fault": backend, "ok": _healthy}
    mode = {"now": "ok"}

    def switch(messages, max_tokens):
        return answers[mode["now"]](messages, max_tokens)

    budget = Budget(tokens=10_000, per="user")
    guard = Guard(switch, model="gpt-4o", budget=budget, timeout=0.5)
    guard.chat("hello", session="s", user="ann")
    before = guard.history.get("s")
    mode["now"] = "fault"
    with pytest.raises(expected):
        guard.chat("and now?", session="s", user="ann")
    rows = guard.ledger.records()
    assert len(rows) == 2 and rows[-1]["error"] and rows[-1]["stop_reason"] == "error"
    assert budget.spent(user="ann")["reserved_tokens"] == 0  # released, not held
    assert budget.spent(user="ann")["tokens"] == sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    assert guard.history.get("s") == before  # the failed turn is not in the history
    mode["now"] = "ok"
    assert guard.chat("again?", session="s", user="ann").text == "fine"  # the next call works
    assert len(guard.history.get("s")) == len(before) + 2


def test_a_hung_stream_times_out_and_is_metered():
    guard = Guard(_hangs_midway, model="gpt-4o", timeout=0.3)
    stream = guard.stream("tell me")
    assert next(stream) == "first piece"
    with pytest.raises(BackendTimeout, match=r"timeout of 0\.3 s"):
        next(stream)
    assert stream.reply is not None and stream.reply.stop_reason == "error"
    assert stream.reply.usage.output_tokens > 0  # what arrived before the hang is metered


def test_an_async_backend_that_hangs_times_out():
    guard = Guard(_hangs_async, model="gpt-4o", timeout=0.3)
    with pytest.raises(BackendTimeout):
        asyncio.run(guard.acomplete("tell me"))
    assert guard.ledger.records()[-1]["stop_reason"] == "error"


def test_a_backend_error_is_a_tokenguard_error_and_a_timeout_a_timeout_error():
    assert issubclass(BackendTimeout, BackendError) and issubclass(BackendTimeout, TimeoutError)
    with pytest.raises(ConfigError, match="timeout"):
        Guard(_healthy, model="gpt-4o", timeout=0)
    with pytest.raises(ConfigError, match="timeout"):
        Guard(_healthy, model="gpt-4o", timeout=True)  # type: ignore[arg-type]


class DiskFullLedger(MemoryLedgerStore):
    """A ledger store whose writes fail, as a full disk makes them."""

    def append(self, row):
        raise StoreError("database or disk is full")


@pytest.mark.parametrize("run", ["sync", "async"])
def test_a_ledger_that_cannot_write_ends_the_call_once(run, caplog):
    # The failed end used to leave the stream open: closing it metered and settled the call again.
    budget = Budget(tokens=1000)
    ended = []
    guard = Guard(lambda messages, max_tokens: iter(["a ", "b"]), model="gpt-4o", budget=budget,
                  ledger=tg.Ledger(DiskFullLedger()))
    guard.meter.observers.append(lambda call, row, error: ended.append(row["stop_reason"]))
    if run == "sync":
        stream = guard.stream("hi")
        with pytest.raises(StoreError, match="disk is full") as failed:
            stream.read()
        stream.close()
        assert list(stream) == []
    else:
        async def read_then_close() -> pytest.ExceptionInfo[StoreError]:
            stream = guard.astream("hi")
            with pytest.raises(StoreError, match="disk is full") as failed:
                await stream.aread()
            await stream.aclose()
            return failed

        failed = asyncio.run(read_then_close())
    assert ended == ["stop"]
    assert failed.value.reply.text == "a b"  # the answer is not lost with the row
    assert "its ledger row could not be written" in caplog.text and '"output_tokens": 2' in caplog.text
    spent = budget.spent()
    assert spent["tokens"] > 0 and spent["reserved_tokens"] == 0  # settled once, to what was used


def test_a_call_cancelled_before_its_first_token_is_billed_its_prompt():
    # The backend had read the prompt (a server prefilled it): leaving before the first token is not free.
    budget = Budget(tokens=10_000)
    asked = asyncio.Event()

    async def thinks_long(messages, max_tokens):
        asked.set()
        await asyncio.sleep(3600)
        yield "too late"

    guard = Guard(thinks_long, model="gpt-4o", budget=budget)

    async def leave_early() -> None:
        task = asyncio.ensure_future(guard.astream("Summarise the whole archive, please.").aread())
        await asyncio.wait_for(asked.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_early())
    never_read = guard.stream("Summarise the whole archive, please.")
    never_read.close()  # opened, never read: the backend was never asked
    cancelled, unread = guard.ledger.records()
    assert cancelled["stop_reason"] == "cancelled" and cancelled["input_tokens"] > 0
    assert (cancelled["output_tokens"], unread["stop_reason"], unread["input_tokens"]) == (0, "cancelled", 0)
    spent = budget.spent()
    assert spent["tokens"] == cancelled["input_tokens"] and spent["reserved_tokens"] == 0


def test_a_refusal_whose_row_cannot_be_written_still_says_why_it_was_refused():
    # A budget over its limit, and a ledger that is down as well: the user is told about the budget.
    guard = Guard(_healthy, model="gpt-4o", budget=Budget(tokens=1), ledger=tg.Ledger(DiskFullLedger()))
    with pytest.raises(BudgetExceeded):
        guard.complete("hi")


_CANCEL_WHILE_ENDING = """
import asyncio, json, time
import tokenguard as tg

budget = tg.Budget(tokens=1000)

@tg.guard(model="gpt-4o", budget=budget, max_output_tokens=500)
async def ask(messages, max_tokens):
    loop = asyncio.get_running_loop()
    for _ in range(8):  # the application's own blocking work fills the default thread pool
        loop.run_in_executor(None, time.sleep, 0.5)
    return "answer"

async def main():
    await ask("warm up")
    task = asyncio.ensure_future(ask("question"))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    deadline = time.monotonic() + 30  # the server goes on: the call must end while it does
    while budget.spent()["reserved_tokens"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    rows = ask.guard.ledger.records()
    print(json.dumps({"rows": [row["stop_reason"] for row in rows], "held": budget.spent()["reserved_tokens"]}))

asyncio.run(main())
"""


def test_a_call_cancelled_while_it_ends_still_leaves_its_row_and_frees_its_hold():
    # The end step waited in the default thread pool's queue, where the caller's
    # cancellation dropped it: no row, and the hold kept for good (the next call was
    # refused). In a fresh process, as an application meets it.
    done = subprocess.run([sys.executable, "-c", _CANCEL_WHILE_ENDING], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"rows": ["stop", "stop"], "held": 0}  # it had answered: not cancelled


@pytest.mark.parametrize("run", ["sync", "async"])
def test_a_timeout_counts_the_backend_s_time_not_a_slow_reader_s(run):
    def quick(messages, max_tokens):
        for i in range(6):
            yield f" w{i}"

    guard = Guard(quick, model="gpt-4o", timeout=0.5, stop=None)
    if run == "sync":
        pieces = []
        for piece in guard.stream("hi"):
            time.sleep(0.15)  # the reader takes its time: 0.9 s in all
            pieces.append(piece)
    else:
        async def read_slowly() -> list[str]:
            got = []
            async for piece in guard.astream("hi"):
                await asyncio.sleep(0.15)
                got.append(piece)
            return got

        pieces = asyncio.run(read_slowly())
    assert len(pieces) == 6 and guard.ledger.records()[0]["stop_reason"] == "stop"


def test_a_timed_stream_closed_early_stops_its_backend():
    produced = []

    def model(messages, max_tokens):
        for i in range(60):
            produced.append(i)
            yield f" word{i}"

    guard = Guard(model, model="gpt-4o", timeout=30, stop=None)
    with guard.stream("hi") as stream:
        for _ in stream:
            break
    time.sleep(0.2)
    assert len(produced) <= 3  # the worker runs at most a chunk ahead of the reader (it prefetched 60)
    never_read = guard.stream("hi")
    time.sleep(0.2)
    never_read.close()
    assert len(produced) <= 3 and never_read.reply.usage.input_tokens == 0  # never asked


def test_a_malformed_answer_is_a_backend_error_with_its_row_and_no_hold():
    # A content of 42 (or a finish_reason of 7) failed inside the end step: no row, the hold kept for good.
    budget = Budget(tokens=2000, per="user")

    def answers(content, finish="stop"):
        def stream(messages, max_tokens):
            yield {"choices": [{"index": 0, "delta": {"content": content}}]}
            yield {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        return stream

    for bad in (answers(42), answers("ok", finish=7)):
        guard = Guard(bad, model="gpt-4o", budget=budget, max_output_tokens=500)
        for _ in range(3):
            with pytest.raises(BackendError, match="malformed answer"):
                guard.complete("hi", user="alice")
        assert [r["stop_reason"] for r in guard.ledger.records()] == ["error"] * 3
    assert budget.spent(user="alice")["reserved_tokens"] == 0
    parts = Guard(answers([{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]), model="gpt-4o")
    assert parts.complete("hi").text == "Hello there"  # content parts, as Mistral's API streams them


def test_a_call_s_parameters_cannot_replace_what_the_guard_sends():
    guard = Guard(tg.backends.OpenAICompatible("http://127.0.0.1:9/v1", "gpt-4o-mini"), max_input_tokens=20)
    for params in ({"messages": [{"role": "user", "content": "word " * 5000}]}, {"model": "gpt-4o"},
                   {"stream": False}, {"n": 2}):  # max_completion_tokens is max_tokens: it may only lower the cap
        with pytest.raises(tg.InvalidRequest):
            guard.complete("hi", **params)  # refused before any request is made


def test_an_async_backend_left_early_is_closed_at_once_sync_and_async():
    closed = []

    async def model(messages, max_tokens):
        try:
            for i in range(100):
                yield f" w{i}"
        finally:
            closed.append(True)

    guard = Guard(model, model="gpt-4o")
    with guard.stream("hi") as stream:
        for _ in stream:
            break
    assert closed == [True]  # its finally ran, on the private loop that drove it

    async def leave() -> None:
        async with guard.astream("hi") as stream:
            async for _ in stream:
                break
        assert closed == [True, True]  # at once, not when the garbage collector gets to it

    asyncio.run(leave())


@pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout is Python 3.11+")
@pytest.mark.parametrize("how", ["sync", "async", "async with a guard timeout"])
def test_a_backend_s_own_timeout_across_its_yields_still_fires(how):
    # Each step ran in a task of its own (the sync API's private loop, wait_for under
    # timeout=): the backend's deadline never fired and a 1 s pause went through.
    async def model(messages, max_tokens):
        async with asyncio.timeout(0.2):
            yield "a"
            await asyncio.sleep(1)
            yield " b"

    guard = Guard(model, model="gpt-4o", timeout=30 if how.endswith("timeout") else None)
    with pytest.raises(TimeoutError) as raised:
        guard.complete("hi") if how == "sync" else asyncio.run(guard.acomplete("hi"))
    assert not isinstance(raised.value, BackendTimeout)  # the backend's own, not the guard's


def test_a_timed_stream_dropped_unclosed_closes_its_backend():
    import gc

    closed = []

    def model(messages, max_tokens):
        try:
            for i in range(60):
                yield f" word{i}"
        finally:
            closed.append(True)

    guard = Guard(model, model="gpt-4o", timeout=30, stop=None)
    stream = guard.stream("hi")
    next(stream)
    del stream  # neither read to the end nor closed
    gc.collect()
    deadline = time.monotonic() + 10
    while not closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed == [True] and guard.ledger.records()[0]["stop_reason"] == "cancelled"


class FailsToWatch:
    """A chunk watcher that cannot start watching some calls."""

    def watch(self, call):
        raise RuntimeError("this watcher cannot watch untagged calls")


def test_a_watcher_that_cannot_start_ends_the_call_and_frees_its_hold():
    budget = Budget(tokens=1000)
    guard = Guard(lambda messages, max_tokens: "never", model="gpt-4o", budget=budget, stop=FailsToWatch())
    for _ in range(3):
        with pytest.raises(RuntimeError, match="cannot watch"):
            guard.complete("hi")
    assert budget.spent()["reserved_tokens"] == 0  # each call's hold was kept for the process's life
    assert [row["stop_reason"] for row in guard.ledger.records()] == ["error"] * 3


class SettleFailsOnce(tg.stores.MemoryBudgetStore):
    """A budget store whose first settlement fails, as a store that blinks does."""

    failed = False

    def settle(self, *args):
        if not self.failed:
            self.failed = True
            raise StoreError("the budget store blinked")
        return super().settle(*args)


def test_a_store_failing_at_settlement_leaves_the_other_budgets_settled():
    blinking, steady = Budget(tokens=1000, store=SettleFailsOnce()), Budget(tokens=1000, name="team")
    guard = Guard(lambda messages, max_tokens: "an answer", model="gpt-4o", budget=[blinking, steady])
    with pytest.raises(StoreError, match="blinked"):
        guard.complete("hi")
    [row] = guard.ledger.records()
    spent = steady.spent()
    assert spent["reserved_tokens"] == 0 and spent["tokens"] == row["input_tokens"] + row["output_tokens"]
    assert blinking.spent()["reserved_tokens"] > 0  # its hold stays until its store answers (or its TTL)
