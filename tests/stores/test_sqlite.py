"""The one SQLite helper: every SQLite store opens its file with the same settings,
and a forked child opens its own connection instead of sharing its parent's."""

from __future__ import annotations

import os
import sqlite3

import pytest

from tokenguard import Budget, Ledger
from tokenguard.stores import SQLITE_SETTINGS, SQLiteBudgetStore, SQLiteDatabase, SQLiteLedgerStore


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


def test_an_in_memory_database_is_private(tmp_path):
    a = SQLiteLedgerStore(None)
    b = SQLiteLedgerStore(None)
    row = {name: None for name in ("request_id", "ts")} | {"request_id": "x", "ts": 1.0}
    a.append(row)
    assert a.count() == 1 and b.count() == 0
