"""Ledger rows in one SQLite file (WAL): many threads and processes append while
others read."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenguard.stores.base import LEDGER_COLUMNS, LEDGER_SUMMED, UNPRICED_SQL, LedgerQuery
from tokenguard.stores.sqlite import SQLiteDatabase

__all__ = ["SQLiteLedgerStore"]

_NAMES = list(LEDGER_COLUMNS)
_SELECT = ", ".join(f'"{name}"' for name in _NAMES)
# Rows come with every column (the LedgerStore contract), so one statement serves all.
_INSERT = f"INSERT INTO calls ({_SELECT}) VALUES ({', '.join('?' * len(_NAMES))})"


# What a column added to an older file holds in that file's rows, where its default
# would be wrong: every call recorded before the call tree existed was a root call.
_BACKFILL = {"root_id": "UPDATE calls SET root_id = request_id WHERE root_id IS NULL"}


def _missing(conn: sqlite3.Connection) -> list[str]:
    have = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
    return [name for name in LEDGER_COLUMNS if name not in have]


def _create(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
    if have and not {"request_id", "ts"} <= have:  # another program's table: not to be altered
        raise sqlite3.DatabaseError("its table 'calls' is not a tokenguard ledger's")
    cols = ", ".join(f'"{name}" {sql}' for name, sql in LEDGER_COLUMNS.items())
    conn.execute(f"CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, {cols})")
    if _missing(conn):  # a file written by an older version: add the columns
        # Under the write lock, so that two processes opening it at once do not both add them.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name in _missing(conn):
                sql = LEDGER_COLUMNS[name]
                default_sql = sql.replace("NOT NULL", "") if "DEFAULT" not in sql else sql
                conn.execute(f'ALTER TABLE calls ADD COLUMN "{name}" {default_sql}')
                if name in _BACKFILL:
                    conn.execute(_BACKFILL[name])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    conn.execute("CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts)")
    # Ledger.find: a budget store reclaiming a dead process's hold looks its call up.
    conn.execute("CREATE INDEX IF NOT EXISTS calls_request_id ON calls(request_id)")


def _where(query: LedgerQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if query.since is not None:
        clauses.append("ts >= ?")
        args.append(query.since)
    if query.until is not None:
        clauses.append("ts < ?")
        args.append(query.until)
    for name, value in query.equals.items():
        if value is None:
            clauses.append(f'"{name}" IS NULL')
        else:
            clauses.append(f'"{name}" = ?')
            args.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class SQLiteLedgerStore:
    """A :class:`~tokenguard.stores.LedgerStore` in a SQLite file (``path=None``: a
    private in-memory database). Keeps every row unless ``max_rows`` is set, then the
    oldest go first, checked every 1,024 writes."""

    def __init__(self, path: str | os.PathLike[str] | None, *, max_rows: int | None = None) -> None:
        self.db = SQLiteDatabase(path, _create)
        self.max_rows = max_rows
        self._writes = 0

    @property
    def path(self) -> Path | None:
        return self.db.path

    def append(self, row: Mapping[str, Any]) -> None:
        with self.db.connection() as conn:
            conn.execute(_INSERT, [row[name] for name in _NAMES])
            self._writes += 1
            if self.max_rows is not None and self._writes % 1024 == 0:
                conn.execute("DELETE FROM calls WHERE id <= (SELECT MAX(id) FROM calls) - ?", (self.max_rows,))

    def select(self, query: LedgerQuery) -> list[dict[str, Any]]:
        where, args = _where(query)
        with self.db.connection() as conn:
            rows = conn.execute(f"SELECT {_SELECT} FROM calls{where} ORDER BY id", args).fetchall()
        return [dict(zip(_NAMES, row, strict=True)) for row in rows]

    def totals(self, query: LedgerQuery) -> dict[str, Any]:
        where, args = _where(query)
        sums = ", ".join(f'SUM("{name}")' for name in LEDGER_SUMMED)
        with self.db.connection() as conn:
            row = conn.execute(f"SELECT COUNT(*), {sums}, {UNPRICED_SQL} FROM calls{where}", args).fetchone()
        *summed, unpriced, unpriced_savings = row[1:]
        return {"calls": row[0], **dict(zip(LEDGER_SUMMED, summed, strict=True)),
                "unpriced": unpriced or 0, "unpriced_savings": unpriced_savings or 0}

    def count(self) -> int:
        with self.db.connection() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"SQLiteLedgerStore({str(self.db.path) if self.db.path else None!r})"
