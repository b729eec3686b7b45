"""RedisBudgetStore on a real redis-server (tests/conftest.py): the same
decisions as the SQLite and memory stores, URL selection, tenants by prefix, windows,
holds that expire when their process dies (and only then), and what a budget does
while Redis cannot be reached: fail closed by default, fail open when asked."""

from __future__ import annotations

import logging
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from _reuse import accounting_tests

import tokenguard as tg
from tokenguard import Budget, Ledger
from tokenguard.errors import BudgetExceeded, ConfigError, MissingDependency, StoreError, TokenGuardError
from tokenguard.stores import (
    BudgetStore,
    MemoryBudgetStore,
    RedisBudgetStore,
    Refusal,
    SQLiteBudgetStore,
    StoreUnavailable,
)
from tokenguard.stores.base import reservation_id
from tokenguard.stores.redis_budget import MAX_EXACT

# -- the same decisions as the other stores ---------------------------------------------

# name -> (limit_tokens, limit_nano_usd): one budget per kind of limit.
_BUDGETS = {"tok": (1_000, None), "usd": (None, 40_000), "both": (1_500, 60_000)}
_KEYS = ["global|", "user:a|2025-06-01", "user:b|2025-06-01T13"]


def _script(seed: int, n: int) -> list[tuple[Any, ...]]:
    """A random sequence of store operations, fixed before any store runs it: settles
    and releases aim at earlier reservations (refused, open, done) or at unknown ids.
    A memory store follows along so that some reservations ask for exactly the room
    left (and one unit more), where an off-by-one in a check would show."""
    rng = random.Random(seed)
    oracle = MemoryBudgetStore()
    ops: list[tuple[Any, ...]] = []
    made: list[tuple[str, str, str]] = []
    for i in range(n):
        kind = rng.choices(["reserve", "settle", "release", "usage"], weights=[5, 3, 2, 1])[0]
        if kind == "reserve" or not made:
            budget, key = rng.choice(list(_BUDGETS)), rng.choice(_KEYS)
            limit_tokens, limit_nano = _BUDGETS[budget]
            tokens, nano_usd = rng.randint(0, 300), rng.randint(0, 12_000)
            if rng.random() < 0.3:  # exactly what is left, or one more, in one unit
                spent_t, spent_u, held_t, held_u = oracle.usage(budget, key)
                edge = rng.choice([0, 1])
                if limit_tokens is not None and (limit_nano is None or rng.random() < 0.5):
                    tokens = max(0, limit_tokens - spent_t - held_t + edge)
                elif limit_nano is not None:
                    nano_usd = max(0, limit_nano - spent_u - held_u + edge)
            rid = f"r{i}"
            made.append((rid, budget, key))
            ops.append(("reserve", rid, budget, key, tokens, nano_usd, limit_tokens, limit_nano))
        elif kind == "usage":
            ops.append(("usage", rng.choice(list(_BUDGETS)), rng.choice(_KEYS)))
        else:
            rid, budget, key = rng.choice(made) if rng.random() < 0.9 else (f"unknown{i}", "tok", "global|")
            if kind == "settle":
                ops.append(("settle", rid, budget, key, rng.randint(0, 300), rng.randint(0, 12_000)))
            else:
                ops.append(("release", rid))
        getattr(oracle, ops[-1][0])(*ops[-1][1:])
    return ops


def _run(store: BudgetStore, ops: list[tuple[Any, ...]]) -> list[Any]:
    results: list[Any] = []
    for op in ops:
        results.append(getattr(store, op[0])(*op[1:]))
    results.append([store.usage(budget, key) for budget in _BUDGETS for key in _KEYS])
    return results


def test_every_operation_answers_as_the_sqlite_and_memory_stores_do(redis_url, tmp_path):
    ops = _script(seed=7, n=600)
    redis_results = _run(RedisBudgetStore(redis_url), ops)
    assert redis_results == _run(SQLiteBudgetStore(tmp_path / "budget.sqlite"), ops)
    assert redis_results == _run(MemoryBudgetStore(), ops)
    # The script exercised what it is for.
    assert any(isinstance(r, Refusal) and r.unit == "tokens" for r in redis_results)
    assert any(isinstance(r, Refusal) and r.unit == "nano_usd" for r in redis_results)
    assert True in redis_results and False in redis_results


@pytest.mark.parametrize(
    "test", ["test_reserve_settle_release", "test_usd_budget_in_exact_units", "test_per_user_and_session_scopes"]
)
def test_the_budget_tests_of_the_other_stores_pass_on_redis(test, redis_url):
    getattr(accounting_tests("test_budget"), test)(redis_url)


# -- selection, options, tenants -----------------------------------------------------------


def test_a_redis_url_selects_one_redis_store_per_url(redis_url):
    a, b = Budget(tokens=10, store=redis_url), Budget(tokens=10, store=redis_url)
    assert isinstance(a.store, RedisBudgetStore) and a.store is b.store
    a.reserve(4).settle(4)
    assert b.spent()["tokens"] == 4
    assert Budget(usd=1, store=redis_url).spent()["tokens"] == 0  # another name, another budget


def test_import_tokenguard_does_not_import_redis():
    code = (
        "import sys, tokenguard\n"
        "from tokenguard.stores import RedisBudgetStore, RedisLedgerStore\n"
        "assert 'redis' not in sys.modules, 'import tokenguard imported redis'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_the_redis_package_a_redis_url_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # what a missing package looks like to import
    url = f"redis://127.0.0.1:1/0?prefix=missing-{uuid.uuid4().hex}:"
    with pytest.raises(MissingDependency, match=r'pip install "tokenguard\[redis\]"'):
        Budget(tokens=1, store=url)
    with pytest.raises(MissingDependency, match=r'pip install "tokenguard\[redis\]"'):
        Ledger(url)


def test_url_options_and_keywords(redis_server):
    store = RedisBudgetStore(redis_server.url())
    assert (store.prefix, store.fail_open, store.reservation_ttl_s) == ("tokenguard:", False, 60.0)
    store = RedisBudgetStore(redis_server.url(prefix="acme:", fail_open="true", reservation_ttl_s="2.5"))
    assert (store.prefix, store.fail_open, store.reservation_ttl_s) == ("acme:", True, 2.5)
    store = RedisBudgetStore(redis_server.url(prefix="acme:", fail_open="1"), prefix="beta:", fail_open=False)
    assert (store.prefix, store.fail_open) == ("beta:", False)  # keywords win over the URL
    for bad in ({"fail_open": "maybe"}, {"reservation_ttl_s": "soon"}, {"reservation_ttl_s": "0"},
                {"reservation_ttl_s": "inf"}, {"reservation_ttl_s": "nan"}, {"reservation_ttl_s": "0.0001"},
                {"colour": "red"}):
        with pytest.raises(ConfigError):
            RedisBudgetStore(redis_server.url(**bad))
    with pytest.raises(ConfigError, match="redis://"):
        RedisBudgetStore("http://127.0.0.1:6379")
    # A database that is no number would have been database 0, shared with whatever is there.
    with pytest.raises(ConfigError, match="the database of a Redis URL is a number"):
        RedisBudgetStore("redis://127.0.0.1:6379/abc")
    with pytest.raises(ConfigError, match="cannot read the Redis URL"):
        RedisBudgetStore("redis://:pw@[::1:6379/0")


@pytest.mark.parametrize("name", ["settle_grace_s", "keep_windows_s", "reservation_ttl_s"])
@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 1e300])
def test_durations_that_are_not_finite_are_config_errors(redis_server, name, value):
    # Each would fail every reservation later (an expiry Redis cannot hold), or not as a ConfigError.
    with pytest.raises(ConfigError, match=name):
        RedisBudgetStore(redis_server.url(), **{name: value})


def test_closing_one_budget_keeps_renewing_the_holds_of_another_on_its_store(redis_server):
    url = redis_server.url(prefix=f"close-{uuid.uuid4().hex[:8]}:", reservation_ttl_s=0.6)
    per_user, overall = Budget(tokens=10**6, per="user", store=url), Budget(tokens=100, store=url)
    assert per_user.store is overall.store  # one store per URL in a process
    held = overall.reserve(100)  # a call that runs for a while
    per_user.close()  # done with that budget
    client = redis_server.client()
    holds = overall.store._scope(overall.name, overall.key()).holds  # type: ignore[attr-defined]
    ((_, expiry),) = client.zrange(holds, 0, -1, withscores=True)
    _wait_past(client, expiry + 300)
    assert overall.spent()["reserved_tokens"] == 100  # still renewed: still held
    with pytest.raises(BudgetExceeded):  # another process finds no room
        Budget(tokens=100, store=RedisBudgetStore(url)).reserve(1)
    held.settle(100)
    per_user.reserve(5, user="ann").settle(5)  # a closed budget works again
    overall.close()
    assert per_user.spent(user="ann")["tokens"] == 5 and overall.spent()["tokens"] == 100


def test_the_password_never_shows(closed_port):
    store = RedisBudgetStore(f"redis://ann:s3cret@127.0.0.1:{closed_port}/0")
    assert "s3cret" not in repr(store) and "ann:***@" in repr(store)
    with pytest.raises(StoreUnavailable) as info:
        store.reserve("r", "b", "global|", 1, 0, 10, None)
    assert "s3cret" not in str(info.value) and "ann:***@127.0.0.1" in str(info.value)


def test_prefixes_keep_tenants_apart(redis_server):
    tenant = uuid.uuid4().hex[:8]
    acme = Budget(tokens=10, store=redis_server.url(prefix=f"acme-{tenant}:"))
    beta = Budget(tokens=10, store=redis_server.url(prefix=f"beta-{tenant}:"))
    acme.reserve(10).settle(10)
    assert beta.spent()["tokens"] == 0
    beta.reserve(10).settle(10)  # the same budget name, its own room
    keys = list(redis_server.client().scan_iter(match=f"*{tenant}*"))
    assert keys and all(k.startswith((f"acme-{tenant}:", f"beta-{tenant}:")) for k in keys)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_its_own_connections_and_leaves_the_parents_holds_alone(redis_url):
    budget = Budget(tokens=100, store=redis_url)
    held = budget.reserve(30)  # the parent renews it
    pid = os.fork()
    if pid == 0:  # the child: inherited objects, its own connection and renewal state
        code = 1
        try:
            assert isinstance(budget.store, RedisBudgetStore) and budget.store._open == {}
            budget.reserve(20).settle(20)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert budget.spent() == {"tokens": 20, "usd": 0.0, "reserved_tokens": 30, "reserved_usd": 0.0}
    held.settle(25)  # the parent's connection still works
    assert budget.spent()["tokens"] == 45


# -- windows, repeats, limits ---------------------------------------------------------------


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def test_a_windows_keys_expire_a_week_after_it_ends(redis_server, redis_url):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    week = 7 * 86_400_000
    new_year = _ms(datetime(3000, 1, 1, tzinfo=timezone.utc))
    for key in ("user:a|2999-12-31T23", "user:a|2999-12-31", "user:a|2999-12"):  # hour, day, month
        assert store.reserve(f"r-{key}", "b", key, 1, 0, 10, None) is None
        assert store.settle(f"r-{key}", "b", key, 1, 0)
        assert client.pexpiretime(store._scope("b", key).spend) == new_year + week
    for key in ("global|", "user:a|2000-01-01"):  # no window; a window long over (never deleted at once)
        assert store.reserve(f"r-{key}", "b", key, 1, 0, 10, None) is None
        assert store.settle(f"r-{key}", "b", key, 1, 0)
        assert client.pexpiretime(store._scope("b", key).spend) == -1
        assert store.usage("b", key) == (1, 0, 0, 0)
    kept = RedisBudgetStore(redis_url, keep_windows_s=None)
    kept.reserve("k", "c", "global|2999-12-31", 1, 0, 10, None)
    assert client.pexpiretime(kept._scope("c", "global|2999-12-31").spend) == -1


def test_a_repeated_reserve_holds_once(redis_url):
    store = RedisBudgetStore(redis_url)
    assert store.reserve("r1", "b", "global|", 10, 5, 100, 100) is None
    assert store.reserve("r1", "b", "global|", 10, 5, 100, 100) is None  # a retry after a lost reply
    assert store.usage("b", "global|") == (0, 0, 10, 5)
    with pytest.raises(StoreError, match="already used by another budget scope"):
        store.reserve("r1", "b", "user:x|", 10, 5, 100, 100)


def test_amounts_past_exact_doubles_are_refused(redis_url):
    store = RedisBudgetStore(redis_url)
    with pytest.raises(ConfigError, match=r"2\*\*53"):
        store.reserve("r", "b", "global|", 1, 0, None, MAX_EXACT + 1)
    assert store.reserve("r", "b", "global|", 1, 0, None, MAX_EXACT) is None


# -- holds that expire -----------------------------------------------------------------------


def _server_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _wait_past(client: Any, moment_ms: float) -> None:
    """Until the Redis server's clock has passed ``moment_ms``."""
    while _server_ms(client) <= moment_ms:
        time.sleep(0.02)


def test_an_expired_hold_stops_counting_and_a_late_settle_still_counts(redis_server, redis_url):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    assert store.reserve("a", "b", "global|", 60, 0, 100, None) is None
    assert store.reserve("b", "b", "global|", 30, 0, 100, None) is None
    assert store.reserve("c", "b", "global|", 20, 0, 100, None) == Refusal("tokens", 20, 10)
    # a's process stops renewing it and its expiry passes (set in the past here rather
    # than waited for; test_a_killed_process... waits for a real one).
    client.zadd(store._scope("b", "global|").holds, {"a": 0})
    assert store.usage("b", "global|") == (0, 0, 30, 0)
    assert store.reserve("c", "b", "global|", 70, 0, 100, None) is None  # a's room is free again
    assert store.settle("a", "b", "global|", 50, 0) is True  # what a's call spent still counts
    assert store.usage("b", "global|") == (50, 0, 100, 0)
    assert store.settle("a", "b", "global|", 50, 0) is False  # once
    assert store.release("a") is False
    client.zadd(store._scope("b", "global|").holds, {"b": 0})
    assert store.release("b") is True  # an expired hold can still be released, once
    assert store.release("b") is False
    assert store.usage("b", "global|") == (50, 0, 70, 0)


def test_an_expired_hold_is_settled_from_its_calls_ledger_row_once(redis_server, redis_url):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    scope = store._scope("b", "global|")
    asked: list[str] = []

    def lookup(request_id: str) -> tuple[int, int] | None:
        asked.append(request_id)
        return (37, 1_234) if request_id in ("written", "stalled") else None

    store.add_settled_lookup(lookup)
    for rid in (reservation_id("written", "b"), reservation_id("unwritten", "b"), "plain-uuid",
                reservation_id("stalled", "b")):
        assert store.reserve(rid, "b", "global|", 100, 5_000, None, None) is None
    # Their processes stop renewing them (the expiry set in the past rather than waited for).
    client.zadd(scope.holds, dict.fromkeys(client.zrange(scope.holds, 0, -1), 0))
    # The first read after the expiry settles the calls with a ledger row: they died
    # between writing it and settling. A call with no row (it never got that far) or
    # no call at all is dropped, as before.
    assert store.usage("b", "global|") == (74, 2_468, 0, 0)
    assert sorted(asked) == ["stalled", "unwritten", "written"]
    assert client.zcard(scope.expired) == 0
    # A process that was only stalled and settles late now counts nothing more...
    assert store.settle(reservation_id("stalled", "b"), "b", "global|", 37, 1_234) is False
    # ... while one whose call had no row when the hold expired still counts its spend.
    assert store.settle(reservation_id("unwritten", "b"), "b", "global|", 10, 0) is True
    assert store.usage("b", "global|") == (84, 2_468, 0, 0)


def test_an_expired_hold_whose_lookup_fails_waits_for_the_next_read(redis_server, redis_url, caplog):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    scope = store._scope("b", "global|")
    answers: list[object] = [OSError("the ledger is gone"), (5, 0)]

    def flaky(request_id: str) -> tuple[int, int] | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    store.add_settled_lookup(flaky)
    assert store.reserve(reservation_id("call", "b"), "b", "global|", 100, 0, None, None) is None
    client.zadd(scope.holds, {reservation_id("call", "b"): 0})
    assert store.usage("b", "global|") == (0, 0, 0, 0)  # no longer held, not yet known
    assert "its dead hold is kept" in caplog.text
    assert store.usage("b", "global|") == (5, 0, 0, 0)  # the next read settles it


def test_a_failure_while_settling_dead_holds_fails_neither_a_reservation_nor_a_read(spare_redis, caplog):
    # Redis stalls (CLIENT PAUSE, past the client's timeout) just after a ledger lookup.
    store = RedisBudgetStore(spare_redis.url(prefix="p:", socket_timeout="0.1"))
    client = spare_redis.client()  # no timeout: its commands wait out a pause
    scope = store._scope("b", "global|")
    stall_next: list[int] = []
    stalled: list[str] = []

    def stalling(request_id: str) -> tuple[int, int]:
        if stall_next:
            stall_next.pop()
            client.execute_command("CLIENT", "PAUSE", "800", "ALL")
            stalled.append(request_id)
        return (5, 0)

    def dead_hold(name: str) -> None:
        rid = reservation_id(name, "b")
        assert store.reserve(rid, "b", "global|", 100, 0, None, None) is None
        store._open.clear()  # its process dies: nothing renews it
        client.zadd(scope.holds, {rid: 0})  # and its expiry passes

    def wait_for_the_stall() -> None:
        deadline = time.monotonic() + 30
        while not stalled:
            assert time.monotonic() < deadline, "the dead hold was never looked up"
            time.sleep(0.01)
        stalled.clear()
        client.ping()  # returns once the pause is over

    store.add_settled_lookup(stalling)
    dead_hold("first")
    stall_next.append(1)
    with caplog.at_level(logging.WARNING, logger="tokenguard.stores"):
        # The reservation is held: it is returned, whatever settling the dead hold meets.
        assert store.reserve(reservation_id("mine", "b"), "b", "global|", 30, 0, 1_000, None) is None
        wait_for_the_stall()
        assert store.release(reservation_id("mine", "b")) is True  # and released: no hold is left behind
        assert store.usage("b", "global|") == (5, 0, 0, 0)  # the dead call counted once Redis answers

        dead_hold("second")
        stall_next.append(1)
        assert store.usage("b", "global|") == (5, 0, 0, 0)  # a read answers with what it read
        wait_for_the_stall()
    assert "could not settle expired budget reservations" in caplog.text
    assert store.usage("b", "global|") == (10, 0, 0, 0)  # the next read settles it


def test_a_reservation_never_waits_on_ledger_lookups(redis_server, redis_url):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    answer, finished = threading.Event(), threading.Event()

    def slow(request_id: str) -> tuple[int, int]:  # a ledger that takes its time
        answer.wait(5)
        finished.set()
        return (37, 0)

    store.add_settled_lookup(slow)
    dead = reservation_id("dead", "b")
    assert store.reserve(dead, "b", "global|", 100, 0, None, None) is None
    store._open.clear()  # its process dies
    client.zadd(store._scope("b", "global|").holds, {dead: 0})
    assert store.reserve(reservation_id("mine", "b"), "b", "global|", 10, 0, 1_000, None) is None
    assert not finished.is_set()  # the reservation came back while the lookup was still going on
    answer.set()
    deadline = time.monotonic() + 30
    while store.usage("b", "global|") != (37, 0, 10, 0):  # settled from the row, once
        assert time.monotonic() < deadline, store.usage("b", "global|")
        time.sleep(0.02)


_HOLD_IN_A_CALL = """
import sys, time
import tokenguard as tg

def backend(messages, max_tokens):
    print("calling", flush=True)
    time.sleep(600)
    return "never"

budget = tg.Budget(tokens=10_000, store=sys.argv[1])
guard = tg.Guard(backend, model="gpt-4o", max_output_tokens=500, budget=budget, ledger=sys.argv[1],
                 stop=None, telemetry=False)
guard.complete("hello", user="u")
"""


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError("the worker never started its call")
    return proc.stdout.readline().decode().strip()


def test_a_live_call_keeps_its_hold_past_the_ttl_and_a_killed_one_loses_it(redis_server):
    ttl_s = 3  # renewed every second: a stall of 2 s would lose it
    url = redis_server.url(prefix=f"kill-{uuid.uuid4().hex[:8]}:", reservation_ttl_s=ttl_s)
    budget, ledger = Budget(tokens=10_000, store=url), Ledger(url)
    assert isinstance(budget.store, RedisBudgetStore)
    client = redis_server.client()
    holds = budget.store._scope(budget.name, budget.key()).holds

    proc = subprocess.Popen([sys.executable, "-c", _HOLD_IN_A_CALL, url], stdout=subprocess.PIPE)
    try:
        assert _read_line(proc) == "calling"
        held = budget.spent()["reserved_tokens"]
        assert held > 500  # exact input + max_output_tokens
        ((_, first_expiry),) = client.zrange(holds, 0, -1, withscores=True)
        # The call outlives its TTL: its process renews the hold, which keeps counting.
        _wait_past(client, first_expiry + 100)
        assert budget.spent()["reserved_tokens"] == held
        ((_, renewed),) = client.zrange(holds, 0, -1, withscores=True)
        assert renewed > first_expiry
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    # Dead, it renews nothing: once its last expiry passes, the hold counts no more.
    ((_, last_expiry),) = client.zrange(holds, 0, -1, withscores=True)
    _wait_past(client, last_expiry)
    assert budget.spent()["reserved_tokens"] == 0
    budget.reserve(10_000).release()  # the whole limit fits again
    assert len(ledger) == 0  # killed mid-call: the call never reached its ledger row


# -- when Redis cannot be reached -------------------------------------------------------------


def test_unreachable_redis_fails_closed(closed_port):
    url = f"redis://127.0.0.1:{closed_port}/0"
    budget = Budget(tokens=100, store=url)
    with pytest.raises(StoreUnavailable, match=f"cannot reach the Redis server at {url} \\(reserving\\)") as info:
        budget.reserve(10)
    assert isinstance(info.value, StoreError) and isinstance(info.value, TokenGuardError)
    assert isinstance(info.value, OSError)
    import redis

    assert isinstance(info.value.__cause__, redis.ConnectionError)
    with pytest.raises(StoreUnavailable):
        budget.spent()

    called: list[str] = []

    def backend(messages: Any, max_tokens: int) -> str:
        called.append("called")
        return "ok"

    guard = tg.Guard(backend, model="gpt-4o", budget=budget, stop=None, telemetry=False)
    with pytest.raises(StoreUnavailable):
        guard.complete("hello")
    assert called == []  # refused before the backend ran
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "error" and "cannot reach the Redis server" in row["error"]
    with pytest.raises(StoreUnavailable, match="appending a row"):
        Ledger(url).write({"user": "u"})


def test_an_outage_fails_closed_or_open_and_both_recover(spare_redis, caplog):
    closed = Budget(tokens=1_000, store=spare_redis.url(prefix="closed:"))
    opened = Budget(tokens=1_000, store=spare_redis.url(prefix="open:", fail_open="true"))
    held = closed.reserve(10)
    spare_redis.stop()

    with pytest.raises(StoreUnavailable):
        closed.reserve(10)
    with pytest.raises(StoreUnavailable):
        held.settle(5)
    with caplog.at_level(logging.WARNING, logger="tokenguard.stores"):
        admitted = [opened.reserve(800), opened.reserve(800)]  # over the limit: nothing is counted
    assert len([r for r in caplog.records if "fail_open=True" in r.message]) == 1  # one warning per outage
    with pytest.raises(StoreUnavailable):
        opened.spent()  # there is no number to report

    spare_redis.start()  # on the same port; empty (no persistence)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenguard.stores"):
        admitted[0].settle(300)  # counted as plain spend now that Redis is back
        admitted[1].release()
    assert any("reachable again" in r.message for r in caplog.records)
    assert opened.spent() == {"tokens": 300, "usd": 0.0, "reserved_tokens": 0, "reserved_usd": 0.0}
    closed.reserve(10).settle(10)  # the same store reconnects by itself
    assert closed.spent()["tokens"] == 10


def test_a_call_settled_from_its_ledger_row_counts_nothing_more_when_its_late_fail_open_settle_comes(
        redis_server, redis_url):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    store.add_settled_lookup(lambda request_id: (37, 0))
    rid = reservation_id("slow", "b")
    assert store.reserve(rid, "b", "global|", 100, 0, None, None) is None
    # Its reply was lost (the call was admitted fail-open, nothing renews the hold) and the hold expired.
    store._open.clear()
    store._admitted.add(rid)
    client.zadd(store._scope("b", "global|").holds, {rid: 0})
    assert store.usage("b", "global|") == (37, 0, 0, 0)  # settled from the call's ledger row
    assert store.settle(rid, "b", "global|", 37, 0) is False  # the call's own settle, late: not again
    assert store.usage("b", "global|") == (37, 0, 0, 0)


def test_a_fail_open_call_settled_during_the_outage_is_counted_once_redis_is_back(spare_redis):
    budget = Budget(tokens=1_000, store=spare_redis.url(prefix="open:", fail_open="true"))
    spare_redis.stop()
    admitted = budget.reserve(100)
    admitted.settle(80)  # Redis is still down: kept in this process
    spare_redis.start()
    deadline = time.monotonic() + 30
    while budget.spent()["tokens"] != 80:  # sent once Redis answers
        assert time.monotonic() < deadline, budget.spent()
        time.sleep(0.02)
    assert budget.spent() == {"tokens": 80, "usd": 0.0, "reserved_tokens": 0, "reserved_usd": 0.0}


# A script that keeps the server busy for ARGV[1] ms: no other client is answered meanwhile.
_BUSY = """
local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local start = ms()
while ms() - start < tonumber(ARGV[1]) do end
return 1
"""


def _busy_server(server: Any, ms: int) -> threading.Thread:
    """Keep ``server`` busy in a script for ``ms``, from another thread; that thread."""
    busy = threading.Thread(target=server.client().eval, args=(_BUSY, 0, ms))
    busy.start()
    time.sleep(0.2)  # the script has started
    return busy


def test_a_fail_open_call_whose_reservation_ran_unanswered_is_counted_when_it_settles(spare_redis, caplog):
    # Redis was only slow: the reservation ran, its reply came too late, the call was admitted.
    budget = Budget(tokens=1_000, store=spare_redis.url(prefix="open:", fail_open="true", socket_timeout="0.1"))
    budget.reserve(1).release()  # connected, its scripts loaded: a process that has been running
    busy = _busy_server(spare_redis, 1_500)
    with caplog.at_level(logging.WARNING, logger="tokenguard.stores"):
        admitted = budget.reserve(100)
    assert "fail_open=True" in caplog.text
    busy.join()
    assert budget.spent()["reserved_tokens"] == 100  # it did run
    admitted.settle(80)
    assert budget.spent() == {"tokens": 80, "usd": 0.0, "reserved_tokens": 0, "reserved_usd": 0.0}


def test_a_full_or_busy_redis_is_unavailable_so_fail_open_admits(spare_redis):
    closed = Budget(tokens=1_000, store=spare_redis.url(prefix="closed:"))
    opened = Budget(tokens=1_000, store=spare_redis.url(prefix="open:", fail_open="true"))
    client = spare_redis.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # full: every write is refused (OOM)
    with pytest.raises(StoreUnavailable, match="full"):
        closed.reserve(10)
    opened.reserve(10).settle(10)  # admitted; counted once Redis takes writes again
    client.config_set("maxmemory", 0)

    client.config_set("lua-time-limit", 100)  # busy-reply-threshold: BUSY after 100 ms of a script
    busy = _busy_server(spare_redis, 1_000)
    try:
        with pytest.raises(StoreUnavailable, match="busy"):
            closed.reserve(10)
        opened.reserve(10).release()
    finally:
        busy.join()
    deadline = time.monotonic() + 30
    while opened.spent()["tokens"] != 10:
        assert time.monotonic() < deadline, opened.spent()
        time.sleep(0.02)


def test_an_expired_hold_dropped_by_a_process_without_a_ledger_is_still_settled_from_it(redis_server, redis_url):
    # A dashboard reading usage (no ledger linked) prunes the dead process's hold first.
    dead, dashboard, guard = (RedisBudgetStore(redis_url) for _ in range(3))
    guard.add_settled_lookup(lambda request_id: (37, 1_234) if request_id == "written" else None)
    client = redis_server.client()
    scope = dead._scope("b", "global|")
    assert dead.reserve(reservation_id("written", "b"), "b", "global|", 100, 5_000, None, None) is None
    dead._stop.set()  # it dies: nothing renews its hold any more
    client.zadd(scope.holds, dict.fromkeys(client.zrange(scope.holds, 0, -1), 0))
    assert dashboard.usage("b", "global|") == (0, 0, 0, 0)  # dropped from the totals, its id kept
    assert guard.usage("b", "global|") == (37, 1_234, 0, 0)  # counted from the call's ledger row
    assert client.zcard(scope.expired) == 0


def test_a_fail_open_call_s_spend_counts_once_when_its_settle_is_sent_again(redis_server, redis_url):
    # The client library sends a command again when its reply was lost: the spend must not double.
    store = RedisBudgetStore(redis_url)
    scope, rid = store._scope("b", "global|"), reservation_id("admitted-while-down", "b")
    args = [17, 5_250, store._expire_at_ms("global|"), store._record_ttl_ms, rid, scope.base]
    runs = [store.redis.run(store._spend, scope.keys(store._record(rid)), args, "settling") for _ in range(2)]
    assert runs == [1, 0]
    assert store.usage("b", "global|") == (17, 5_250, 0, 0)


def test_a_key_of_the_wrong_type_fails_a_reservation_before_it_holds_anything(redis_server, redis_url):
    store = RedisBudgetStore(redis_url)
    client = redis_server.client()
    scope = store._scope("b", "global|")
    client.set(scope.amounts, "not a hash")  # another program wrote there
    with pytest.raises(StoreError, match=r"WRONGTYPE .* holds a string, not a hash of tokenguard"):
        store.reserve(reservation_id("one", "b"), "b", "global|", 100, 0, None, None)
    client.delete(scope.amounts)
    assert store.usage("b", "global|") == (0, 0, 0, 0)  # nothing is held for good
