"""The ledger: one row per call, in memory or in real SQLite (WAL) shared by threads
and processes. What a user relies on is tested on every store."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from tokenguard import InvalidRequest
from tokenguard.accounting import COLUMNS, Ledger
from tokenguard.errors import StoreError

REQUIRED = {
    "request_id", "ts", "user", "session", "model", "input_tokens", "output_tokens",
    "cached_input_tokens", "cost_usd", "latency_s", "stop_reason", "tags",
}


def _row(i: int, **extra):
    return {
        "user": f"u{i % 3}", "session": f"s{i % 5}", "model": "gpt-4o", "backend": "callable",
        "input_tokens": 10 + i, "output_tokens": i, "cached_input_tokens": 0,
        "cost_usd": 0.001 * i, "latency_s": 0.01, "stop_reason": "stop", **extra,
    }


@pytest.fixture(params=["memory", "sqlite"])
def ledger(request, tmp_path):
    return Ledger() if request.param == "memory" else Ledger(tmp_path / "ledger.sqlite")


def test_ledger_round_trips_rows(ledger):
    rid = ledger.write(_row(1, tags={"team": "search"}, request_id="abc"))
    assert rid == "abc"
    (rec,) = ledger.records()
    assert rec.keys() >= REQUIRED
    assert rec["tags"] == {"team": "search"}
    assert rec["input_tokens"] == 11 and rec["cost_usd"] == pytest.approx(0.001)
    assert rec["ts"] == pytest.approx(time.time(), abs=5)


def test_filters_and_totals(ledger):
    for i in range(12):
        ledger.write(_row(i))
    ledger.write(_row(99, cost_usd=None, stop_reason="error", error="boom"))
    assert len(ledger.records(user="u1")) == 4
    assert len(ledger.records(user="u1", session="s1")) == 1
    assert [r["error"] for r in ledger.records(stop_reason="error")] == ["boom"]
    assert len(ledger.records(cost_usd=None)) == 1
    totals = ledger.totals(stop_reason="stop")
    assert totals["calls"] == 12
    assert totals["output_tokens"] == sum(range(12))
    assert totals["cost_usd"] == pytest.approx(0.001 * sum(range(12)))
    assert ledger.totals(user="nobody")["cost_usd"] is None
    # A row that spent tokens at an unknown price makes the sum unknown, as in a report.
    assert ledger.totals()["cost_usd"] is None is ledger.report().totals["cost_usd"]
    ledger.write(_row(5, saved_tokens=40, saved_usd=None, cost_usd=0.0, cached=1))
    assert ledger.totals(cached=1)["saved_usd"] is None and ledger.totals(cached=1)["cost_usd"] == 0.0
    assert len(ledger.records(since=0, until=time.time() + 1)) == 14
    # Bounds as report() takes them: an ISO date, a date, a datetime (they were compared as strings).
    assert len(ledger.records(since="1990-01-01")) == ledger.totals(since=date(1990, 1, 1))["calls"] == 14
    assert ledger.records(since=datetime.now(timezone.utc) + timedelta(days=1)) == []
    with pytest.raises(InvalidRequest, match="a time"):
        ledger.records(since="yesterday-ish")
    with pytest.raises(InvalidRequest, match="unknown ledger filter 'colour'"):
        ledger.records(colour="red")
    with pytest.raises(InvalidRequest, match="unknown ledger columns"):
        ledger.write({"colour": "red"})
    assert len(ledger) == 14  # the refused row wrote nothing
    # Values a report could not read are refused too: the ledger would keep them for good.
    for bad in ({"cost_usd": "0.1"}, {"input_tokens": -3}, {"input_tokens": 2.5}, {"ts": time.time() * 1000},
                {"latency_s": float("nan")}, {"user": 42}):
        with pytest.raises(InvalidRequest, match=r"ledger column|a time"):
            ledger.write(_row(1, **bad))
    assert len(ledger) == 14 and ledger.report().totals["calls"] == 14
    # numpy's numbers and whole floats are numbers: a backend may report counts in them.
    import numpy as np

    ledger.write(_row(2, input_tokens=np.int64(7), output_tokens=3.0, cost_usd=np.float32(0.5), cached=True))
    row = ledger.records()[-1]
    assert (row["input_tokens"], row["output_tokens"], row["cached"]) == (7, 3, 1) and row["cost_usd"] == 0.5
    assert type(row["input_tokens"]) is int and type(row["cost_usd"]) is float


def test_file_ledger_is_wal_and_durable(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.write(_row(1, tags=["a", "b"]))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    again = Ledger(path)
    assert again.records()[0]["tags"] == ["a", "b"]


def test_old_files_gain_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE calls (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, ts REAL NOT NULL)")
    conn.execute("INSERT INTO calls (request_id, ts) VALUES ('old', 1.0)")
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    ledger.write(_row(2))
    recs = ledger.records()
    assert recs[0]["request_id"] == "old" and recs[0]["input_tokens"] == 0
    assert set(recs[1]) == set(COLUMNS)


def test_text_that_is_no_utf8_is_kept_with_a_mark_in_its_place(ledger):
    # An error message quoting half of a UTF-16 pair: no store takes it as it is.
    ledger.write(_row(1, error="ValueError: bad input '\ud800'"))
    assert ledger.records()[0]["error"] == "ValueError: bad input '?'"


def test_another_program_s_calls_table_is_left_alone(tmp_path):
    path = tmp_path / "app.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE calls (id INTEGER PRIMARY KEY, phone TEXT NOT NULL, minutes INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a tokenguard ledger"):
        Ledger(path)
    conn = sqlite3.connect(path)
    assert [row[1] for row in conn.execute("PRAGMA table_info(calls)")] == ["id", "phone", "minutes"]
    conn.close()


# The schema before the call tree (depth, parent_id, root_id, scope) was recorded.
_BEFORE_CALL_TREES = {
    "request_id": "TEXT NOT NULL", "ts": "REAL NOT NULL", "user": "TEXT", "session": "TEXT", "model": "TEXT",
    "backend": "TEXT", "input_tokens": "INTEGER NOT NULL DEFAULT 0", "output_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cached_input_tokens": "INTEGER NOT NULL DEFAULT 0", "saved_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cost_usd": "REAL", "latency_s": "REAL", "stop_reason": "TEXT", "tags": "TEXT", "error": "TEXT",
}


def test_a_file_from_before_call_trees_keeps_its_rows_as_root_calls(tmp_path):
    path = tmp_path / "before.sqlite"
    conn = sqlite3.connect(path)
    cols = ", ".join(f'"{name}" {sql}' for name, sql in _BEFORE_CALL_TREES.items())
    conn.execute(f"CREATE TABLE calls (id INTEGER PRIMARY KEY, {cols})")
    conn.executemany(
        "INSERT INTO calls (request_id, ts, model, input_tokens, output_tokens) VALUES (?, ?, 'gpt-4o', ?, 1)",
        [(f"old{i}", float(i), 10 + i) for i in range(3)],
    )
    conn.commit()
    conn.close()

    ledger = Ledger(path)
    old = ledger.records()
    assert [row["request_id"] for row in old] == ["old0", "old1", "old2"]
    assert [row["input_tokens"] for row in old] == [10, 11, 12]
    assert all(row["depth"] == 0 and row["parent_id"] is None and row["scope"] is None for row in old)
    assert [row["root_id"] for row in old] == ["old0", "old1", "old2"]  # each was a root call
    ledger.write(_row(4, request_id="child", depth=1, parent_id="old2", root_id="old2", scope="s"))
    ledger.close()
    again = Ledger(path)  # opening it again adds nothing and changes nothing
    assert [row["request_id"] for row in again.records(root_id="old2")] == ["old2", "child"]
    assert again.records(depth=1)[0]["scope"] == "s"
    assert again.totals()["calls"] == 4


def test_in_memory_ledger_is_bounded():
    ledger = Ledger(max_rows=1000)
    for i in range(3000):
        ledger.write(_row(i))
    assert 1000 <= len(ledger) <= 1000 + 1024
    assert ledger.records()[-1]["input_tokens"] == 10 + 2999


def test_threads_share_one_ledger(tmp_path):
    ledger = Ledger(tmp_path / "t.sqlite")

    def work(k: int) -> None:
        for i in range(50):
            ledger.write(_row(i, user=f"t{k}"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger) == 16 * 50
    assert len({r["request_id"] for r in ledger.records()}) == 16 * 50


def _write_rows(path: str, k: int, n: int) -> None:
    ledger = Ledger(path)
    for i in range(n):
        ledger.write(_row(i, user=f"p{k}"))
    ledger.close()


def test_processes_share_one_ledger_file(tmp_path):
    path = str(tmp_path / "p.sqlite")
    Ledger(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(path, k, 100)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ledger = Ledger(path)
    assert len(ledger) == 400
    assert {r["user"] for r in ledger.records()} == {"p0", "p1", "p2", "p3"}
