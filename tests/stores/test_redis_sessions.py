"""RedisSessionStore on a real redis-server (tests/conftest.py): the same answers as
SQLiteSessionStore, step for step; appends from many processes and threads to one
session all land; an update sent twice (a retry after a lost reply) applies once;
pruning in batches; tenants by prefix; an unreachable server fails closed.

SessionHistory's own persistence tests run on both stores in tests/context/test_history.py.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
from typing import Any

import pytest

from tokenguard.context import SessionHistory
from tokenguard.errors import StoreError
from tokenguard.stores import RedisSessionStore, SQLiteSessionStore, StoreUnavailable
from tokenguard.stores import redis_sessions as redis_sessions_module


def _msg(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_the_same_answers_as_sqlite_step_for_step(redis_url, tmp_path):
    """A seeded random script of every operation, on both stores: every answer agrees
    (uses are distinct times, so "least recently used" has one meaning)."""
    sqlite, redis = SQLiteSessionStore(tmp_path / "s.sqlite"), RedisSessionStore(redis_url)
    rng = random.Random(7)
    names = ["a", "b", "c", "d", "e", "人工智能", "with:colon", ""]
    pruned = found = 0
    for step in range(400):
        now = float(step) + rng.random() / 2  # strictly increasing
        name = rng.choice(names)
        op = rng.choice(["load", "mark", "update", "update", "delete", "prune", "len"])
        if op == "load":
            assert redis.load(name) == sqlite.load(name), step
            found += sqlite.load(name) is not None
        elif op == "mark":
            assert redis.load(name, used=now) == sqlite.load(name, used=now), step
        elif op == "update":
            text = f"{step} 🚀"

            def change(messages: list[dict[str, Any]], text: str = text) -> list[dict[str, Any]]:
                return [*messages, _msg(text)][-3:]

            assert redis.update(name, change, now) == sqlite.update(name, change, now), step
        elif op == "delete":
            redis.delete(name)
            sqlite.delete(name)
        elif op == "prune":
            unused_since = None if rng.random() < 0.3 else now - rng.uniform(0, 60)
            keep = rng.randint(1, 6)
            gone = sqlite.prune(unused_since=unused_since, keep=keep)
            assert sorted(redis.prune(unused_since=unused_since, keep=keep)) == sorted(gone), step
            pruned += len(gone)
        assert len(redis) == len(sqlite), step
    assert pruned > 20 and found > 20  # the script did prune and find sessions
    # What is left reads back the same, messages and last use.
    for name in names:
        assert redis.load(name) == sqlite.load(name)


def test_unicode_and_float_times_round_trip(redis_url):
    store = RedisSessionStore(redis_url)
    messages = [_msg("人工智能 🚀"), {"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]
    used = 1_750_000_000.123456
    assert store.update("s", lambda old: old + messages, used) == messages
    assert store.load("s") == (messages, used)
    assert store.load("s", used=used + 0.5) == (messages, used)  # the use before this one
    assert store.load("s") == (messages, used + 0.5)


def _append_many(url: str, worker: int, threads: int, appends: int) -> None:
    """One process: ``threads`` threads, each appending ``appends`` numbered turns to
    the one session through a store of its own process."""
    store = RedisSessionStore(url)

    def work(thread: int) -> None:
        for i in range(appends):
            store.update("shared", lambda old, t=f"{worker}.{thread}.{i}": [*old, _msg(t)], float(i))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def test_appends_from_processes_and_threads_to_one_session_all_land(redis_url):
    processes, threads, appends = 2, 8, 15
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(redis_url, w, threads, appends)) for w in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    found = RedisSessionStore(redis_url).load("shared")
    assert found is not None
    texts = [m["content"] for m in found[0]]
    assert len(texts) == len(set(texts)) == processes * threads * appends  # none lost, none twice
    for w in range(processes):  # each thread's turns in its own order
        for t in range(threads):
            mine = [text for text in texts if text.startswith(f"{w}.{t}.")]
            assert mine == [f"{w}.{t}.{i}" for i in range(appends)]


def test_an_update_sent_twice_applies_once(redis_url, monkeypatch):
    """redis-py sends a script again when the reply was lost; the write's token makes
    the second send a no-op that still answers "done"."""
    store = RedisSessionStore(redis_url)
    run = store.redis.run
    sends: list[int] = []

    def twice(script: Any, keys: Any, args: Any, doing: str) -> Any:
        if script is store._update:
            run(script, keys, args, doing)  # landed, but its reply was "lost"
            sends.append(1)
        return run(script, keys, args, doing)

    monkeypatch.setattr(store.redis, "run", twice)
    store.update("s", lambda old: [*old, _msg("one")], 1.0)
    store.update("s", lambda old: [*old, _msg("two")], 2.0)
    assert len(sends) == 2
    assert store.load("s") == ([_msg("one"), _msg("two")], 2.0)


def test_an_update_that_always_loses_the_race_gives_up_with_a_store_error(redis_url, monkeypatch):
    monkeypatch.setattr(redis_sessions_module, "_UPDATE_ATTEMPTS", 3)
    store, other = RedisSessionStore(redis_url), RedisSessionStore(redis_url)
    store.update("s", lambda old: [_msg("start")], 1.0)
    calls = 0

    def change(old: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        other.update("s", lambda o: [*o, _msg(f"other {calls}")], 2.0)  # someone writes in between
        return [*old, _msg("mine")]

    with pytest.raises(StoreError, match="3 attempts"):
        store.update("s", change, 3.0)
    found = store.load("s")
    assert calls == 3 and found is not None
    assert [m["content"] for m in found[0]] == ["start", "other 1", "other 2", "other 3"]  # never "mine"


def test_prune_deletes_a_backlog_in_batches(redis_url, monkeypatch):
    monkeypatch.setattr(redis_sessions_module, "_PRUNE_BATCH", 3)
    store = RedisSessionStore(redis_url)
    for i in range(12):
        store.update(f"s{i:02}", lambda old: [_msg("x")], float(i))
    gone = store.prune(unused_since=5.0, keep=4)  # s00-s04 unused, then all but the 4 newest
    assert sorted(gone) == [f"s{i:02}" for i in range(8)]
    assert len(store) == 4 and store.load("s07") is None and store.load("s08") is not None
    assert store.prune(unused_since=None, keep=4) == []
    assert sorted(store.prune(unused_since=None, keep=1)) == ["s08", "s09", "s10"]


def test_tenants_by_prefix_never_see_each_other(redis_server):
    acme = RedisSessionStore(redis_server.url(prefix="acme-sessions:"))
    umbrella = RedisSessionStore(redis_server.url(), prefix="umbrella-sessions:")  # the keyword overrides
    acme.update("s", lambda old: [_msg("acme's")], 1.0)
    assert umbrella.load("s") is None and len(umbrella) == 0
    umbrella.prune(unused_since=None, keep=1)
    assert acme.load("s") == ([_msg("acme's")], 1.0)
    keys = redis_server.client().keys("acme-sessions:*")
    assert sorted(k for k in keys if "session-write" not in k) == ["acme-sessions:session:s", "acme-sessions:sessions"]
    acme.delete("s")
    assert [k for k in redis_server.client().keys("acme-sessions:*") if "session-write" not in k] == []


def test_an_unreachable_server_fails_closed(closed_port):
    url = f"redis://127.0.0.1:{closed_port}/0"
    store = RedisSessionStore(url)
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{closed_port}"):
        store.load("s")
    with pytest.raises(StoreUnavailable):
        store.update("s", lambda old: old, 1.0)
    history = SessionHistory(path=url)  # nothing connects before the first use
    with pytest.raises(StoreUnavailable):
        history.append("s", _msg("hi"))
    with pytest.raises(StoreUnavailable):
        history.get("s")
    assert repr(store) == f"RedisSessionStore('redis://127.0.0.1:{closed_port}/0', prefix='tokenguard:')"
