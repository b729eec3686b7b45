"""RedisLedgerStore on a real redis-server (tests/conftest.py): rows read back,
filter and sum as they do from the SQLite ledger; a repeated append writes once;
``max_rows`` keeps the newest; a Guard takes a ``redis://`` ledger."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from _reuse import accounting_tests

import tokenguard as tg
from tokenguard import Budget, Ledger
from tokenguard.errors import ConfigError
from tokenguard.stores import RedisLedgerStore
from tokenguard.stores import redis_ledger as redis_ledger_module
from tokenguard.stores.base import LEDGER_COLUMNS

_COLUMNS = list(LEDGER_COLUMNS)


def _rows(n: int) -> list[dict[str, Any]]:
    """Rows with every kind of value a column holds: missing ones, ints where floats
    belong (``ts``, ``latency_s``), tags, errors, nested calls."""
    rows = []
    for i in range(n):
        rows.append({
            "request_id": f"req{i}",
            "ts": 1_750_000_000 + 37 * i,  # an int: a REAL column gives back a float
            "user": None if i % 7 == 0 else f"u{i % 3}",
            "session": f"s{i % 4}",
            "model": "gpt-4o" if i % 2 else "llama",
            "input_tokens": 10 + i,
            "output_tokens": i % 5,
            "cost_usd": None if i % 5 == 0 else 0.0001 * i,
            "latency_s": 1 if i % 3 == 0 else 0.01 * i,
            "stop_reason": "error" if i % 6 == 0 else "stop",
            "error": "boom" if i % 6 == 0 else None,
            "tags": {"team": "search", "i": i} if i % 4 == 0 else None,
            "depth": i % 2,
            "root_id": f"req{i - i % 2}",
        })
    return rows


_FILTERS: list[dict[str, Any]] = [
    {},
    {"user": "u1"},
    {"user": None},
    {"session": "s2", "model": "gpt-4o"},
    {"cost_usd": None},
    {"stop_reason": "error"},
    {"depth": 1},
    {"since": 1_750_000_000 + 37 * 10},
    {"until": 1_750_000_000 + 37 * 10},
    {"since": 1_750_000_000 + 37 * 5, "until": 1_750_000_000 + 37 * 30, "user": "u2"},
    {"user": "nobody"},
]


def _typed(rows: list[dict[str, Any]]) -> list[list[tuple[str, Any, type]]]:
    return [[(name, value, type(value)) for name, value in row.items()] for row in rows]


def test_rows_filters_and_totals_match_the_sqlite_ledger(redis_url, tmp_path):
    on_redis, on_sqlite = Ledger(redis_url), Ledger(tmp_path / "ledger.sqlite")
    assert isinstance(on_redis.store, RedisLedgerStore)
    for row in _rows(60):
        on_redis.write(row)
        on_sqlite.write(row)
    assert len(on_redis) == len(on_sqlite) == 60
    for filters in _FILTERS:
        assert _typed(on_redis.records(**filters)) == _typed(on_sqlite.records(**filters)), filters
        expected = on_sqlite.totals(**filters)
        got = on_redis.totals(**filters)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            if isinstance(value, float):  # SQLite's SUM may add in another order
                assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), (filters, name)
                assert isinstance(got[name], float)
            else:
                assert (got[name], type(got[name])) == (value, type(value)), (filters, name)
    report = on_redis.report(by=["user", "model"])
    assert report.rows == on_sqlite.report(by=["user", "model"]).rows


@pytest.mark.parametrize("test", ["test_ledger_round_trips_rows", "test_filters_and_totals"])
def test_the_ledger_tests_of_the_other_stores_pass_on_redis(test, redis_url):
    getattr(accounting_tests("test_ledger"), test)(Ledger(redis_url))


def test_rows_are_read_in_pages_in_write_order(redis_url, monkeypatch):
    monkeypatch.setattr(redis_ledger_module, "_PAGE", 7)
    ledger = Ledger(redis_url)
    ids = [ledger.write({"user": "u", "input_tokens": i}) for i in range(30)]
    assert [row["request_id"] for row in ledger.records()] == ids
    assert ledger.totals()["input_tokens"] == sum(range(30))


def test_a_repeated_append_writes_one_row(redis_url):
    store = RedisLedgerStore(redis_url)
    row = json.dumps({"request_id": "r", "ts": 1.0})
    token = f"{store.prefix}ledger-append:{uuid.uuid4().hex}"
    keys = [store.stream, token, store._ids, store._dups, store._ids_from]
    for _ in range(2):  # as a retry after a dropped reply would send it again
        store.redis.run(store._append, keys, [row, "", 60_000, "r", 1000], "appending a row")
    assert store.count() == 1
    assert store.redis.client.scard(store._dups) == 0  # indexed once


def test_max_rows_keeps_the_newest(redis_url):
    ledger = Ledger(redis_url, max_rows=5)
    for i in range(12):
        ledger.write({"input_tokens": i})
    assert [row["input_tokens"] for row in ledger.records()] == [7, 8, 9, 10, 11]
    with pytest.raises(ConfigError):
        RedisLedgerStore(redis_url, max_rows=0)


def _counting_reads(store: RedisLedgerStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request ids of the rows the store reads from its stream, from now on."""
    read: list[str] = []
    rows = store._rows

    def counting(*args: Any) -> Any:
        for row in rows(*args):
            read.append(row["request_id"])
            yield row

    monkeypatch.setattr(store, "_rows", counting)
    return read


def test_a_call_s_row_is_found_without_reading_the_ledger(redis_server, redis_url, monkeypatch):
    ledger = Ledger(redis_url)
    store = ledger.store
    assert isinstance(store, RedisLedgerStore)
    legacy = {"request_id": "legacy", "ts": 1.0, "input_tokens": 7}  # written before the index existed
    redis_server.client().xadd(store.stream, {"row": json.dumps({name: legacy.get(name) for name in _COLUMNS})})
    ids = [ledger.write({"input_tokens": i}) for i in range(50)]
    read = _counting_reads(store, monkeypatch)
    assert ledger.find(ids[30])["input_tokens"] == 30
    assert read == []  # from the index: no row read but its own
    assert ledger.find("nope") is None
    assert ledger.find("legacy")["input_tokens"] == 7
    assert read == ["legacy", "legacy"]  # only the rows older than the index are read
    assert [row["request_id"] for row in ledger.records(request_id=ids[3])] == [ids[3]]


def test_the_index_keeps_what_the_ledger_keeps(redis_url):
    ledger = Ledger(redis_url, max_rows=5)
    store = ledger.store
    assert isinstance(store, RedisLedgerStore)
    ids = [ledger.write({"input_tokens": i}) for i in range(12)]
    assert store.redis.client.hlen(store._ids) == 5
    assert ledger.find(ids[6]) is None and ledger.find(ids[7])["input_tokens"] == 7
    twice = ledger.write({"request_id": "twice", "input_tokens": 1})  # a request_id written again
    ledger.write({"request_id": twice, "input_tokens": 2})
    assert ledger.find(twice)["input_tokens"] == 1  # the first, as from SQLite
    assert [row["input_tokens"] for row in ledger.records(request_id=twice)] == [1, 2]


def test_a_guard_meters_into_a_redis_ledger_and_budget(redis_url):
    guard = tg.Guard(lambda messages, max_tokens: "four words of text", model="gpt-4o",
                     budget=Budget(tokens=1_000, per="user", store=redis_url), ledger=redis_url, telemetry=False)
    replies = [guard.complete(f"question {i}", user="ann") for i in range(3)]
    rows = Ledger(redis_url).records(user="ann")
    assert [row["request_id"] for row in rows] == [reply.request_id for reply in replies]
    spent = Budget(tokens=1_000, per="user", store=redis_url).spent(user="ann")
    assert spent["tokens"] == sum(row["input_tokens"] + row["output_tokens"] for row in rows)
    assert spent["reserved_tokens"] == 0
