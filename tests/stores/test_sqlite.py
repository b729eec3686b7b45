"""The one SQLite helper: every SQLite store opens its file with the same settings,
a forked child opens its own connection instead of sharing its parent's, and a file
that cannot be opened or used raises a StoreError naming it."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3

import pytest

from tokenguard import Budget, Ledger, TokenGuardError
from tokenguard.errors import StoreError
from tokenguard.stores import (
    LEDGER_COLUMNS,
    SQLITE_SETTINGS,
    SQLiteBudgetStore,
    SQLiteDatabase,
    SQLiteLedgerStore,
    SQLiteSettings,
)
from tokenguard.stores import sqlite as sqlite_module


def _pragmas(db: SQLiteDatabase) -> tuple[str, int, int]:
    with db.connection() as conn:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA busy_timeout").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
        )


def test_budget_and_ledger_files_share_one_set_of_settings(tmp_path):
    budget_db = SQLiteBudgetStore(tmp_path / "budget.sqlite").db
    ledger_db = SQLiteLedgerStore(tmp_path / "ledger.sqlite").db
    expected = (
        SQLITE_SETTINGS.journal_mode.lower(),
        int(SQLITE_SETTINGS.busy_timeout_s * 1000),
        1,  # NORMAL
    )
    assert _pragmas(budget_db) == expected
    assert _pragmas(ledger_db) == expected


def test_a_transaction_rolls_back_on_error(tmp_path):
    db = SQLiteDatabase(tmp_path / "t.sqlite", lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (x)") and None)
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("midway")
    with db.connection() as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(tokens=100, store=tmp_path / "budget.sqlite")
    ledger.write({"user": "parent"})
    budget.reserve(10).settle(10)
    pid = os.fork()
    if pid == 0:  # the child: write through the objects it inherited
        try:
            ledger.write({"user": "child"})
            budget.reserve(20).settle(20)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert [r["user"] for r in ledger.records()] == ["parent", "child"]
    assert budget.spent()["tokens"] == 30
    # The parent's connection still works after the child's exit closed nothing of it.
    ledger.write({"user": "parent again"})
    assert len(ledger) == 3
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 3
    conn.close()


def _open_when_all_are_ready(path: str, store: str, ready) -> None:
    ready.wait()
    (SQLiteLedgerStore if store == "ledger" else SQLiteBudgetStore)(path)


@pytest.mark.parametrize("store", ["ledger", "budget"])
def test_processes_that_create_one_file_at_once_all_open_it(tmp_path, store):
    # Switching a new file to WAL needs it to itself, and SQLite answers "locked" at
    # once to the others instead of waiting: the opener must wait for them.
    ctx = mp.get_context("fork")
    for trial in range(15):
        path = str(tmp_path / f"{trial}.sqlite")
        ready = ctx.Barrier(10)
        procs = [ctx.Process(target=_open_when_all_are_ready, args=(path, store, ready)) for _ in range(10)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 10, f"trial {trial}"


def test_an_in_memory_database_is_private(tmp_path):
    a = SQLiteLedgerStore(None)
    b = SQLiteLedgerStore(None)
    counts = {name: 0 for name, sql in LEDGER_COLUMNS.items() if sql.startswith("INTEGER NOT NULL")}
    row = dict.fromkeys(LEDGER_COLUMNS) | counts | {"request_id": "x", "ts": 1.0}
    a.append(row)
    assert a.count() == 1 and b.count() == 0


def _assert_store_error(info: pytest.ExceptionInfo[StoreError], path: object) -> None:
    assert str(path) in str(info.value)
    assert isinstance(info.value, TokenGuardError) and isinstance(info.value, OSError)
    assert isinstance(info.value.__cause__, (sqlite3.Error, OSError))


def test_a_ledger_path_that_is_a_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open") as info:
        Ledger(tmp_path)
    _assert_store_error(info, tmp_path)


def test_a_ledger_path_under_a_file_is_a_store_error(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    path = tmp_path / "notes.txt" / "ledger.sqlite"
    with pytest.raises(StoreError, match="cannot open") as info:
        Ledger(path)
    _assert_store_error(info, path)


def test_a_budget_file_that_is_not_sqlite_is_a_store_error_and_is_not_kept(tmp_path):
    path = tmp_path / "budget.sqlite"
    path.write_text("these are my notes, not a database\n" * 50)
    with pytest.raises(StoreError, match="not a database") as info:
        Budget(tokens=5, store=path)
    _assert_store_error(info, path)
    path.unlink()  # once the file is fixed, the same path opens: the failure was not cached
    budget = Budget(tokens=5, store=path)
    budget.reserve(3).settle(3)
    assert budget.spent()["tokens"] == 3


def test_a_busy_timeout_is_a_store_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_module, "SQLITE_SETTINGS", SQLiteSettings(busy_timeout_s=0.05))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(tokens=100, store=tmp_path / "budget.sqlite")
    holders = [sqlite3.connect(tmp_path / name, isolation_level=None) for name in ("ledger.sqlite", "budget.sqlite")]
    for holder in holders:  # another process holds each file's write lock
        holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="database is locked") as info:
        ledger.write({"user": "u"})
    _assert_store_error(info, tmp_path / "ledger.sqlite")
    with pytest.raises(StoreError, match="database is locked") as info:
        budget.reserve(10)
    _assert_store_error(info, tmp_path / "budget.sqlite")
    for holder in holders:
        holder.execute("ROLLBACK")
        holder.close()
    ledger.write({"user": "u"})  # the lock is gone: both work again
    budget.reserve(10).settle(10)
    assert len(ledger) == 1 and budget.spent()["tokens"] == 10


def test_only_sqlite_errors_in_the_block_become_store_errors(tmp_path):
    db = SQLiteDatabase(tmp_path / "t.sqlite", lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (x)") and None)
    with pytest.raises(StoreError, match="no such table") as info, db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("INSERT INTO missing VALUES (1)")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(KeyError), db.connection():
        raise KeyError("the caller's own")
    with db.connection() as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0  # rolled back
