"""The usage ledger: one SQLite row per call, whatever became of the call.

A file ledger is in WAL mode, so many threads and processes on one machine append
to it while others read. ``Ledger()`` with no path keeps the rows in memory (bounded:
the oldest rows go first) so that a :class:`~tokenguard.Guard` always has one.

>>> ledger = Ledger()
>>> request_id = ledger.write({"model": "gpt-4o", "input_tokens": 12, "output_tokens": 3})
>>> ledger.records(model="gpt-4o")[0]["input_tokens"]
12
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "Ledger"]

# The schema as data: column -> SQL type. A column added here is added to existing
# ledger files when they are opened (ALTER TABLE), so old files keep working.
COLUMNS: dict[str, str] = {
    "request_id": "TEXT NOT NULL",
    "ts": "REAL NOT NULL",
    "user": "TEXT",
    "session": "TEXT",
    "model": "TEXT",
    "backend": "TEXT",
    "input_tokens": "INTEGER NOT NULL DEFAULT 0",
    "output_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cached_input_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cost_usd": "REAL",
    "latency_s": "REAL",
    "stop_reason": "TEXT",
    "tags": "TEXT",
    "error": "TEXT",
}
_SUMMED = ("input_tokens", "output_tokens", "cached_input_tokens", "cost_usd", "latency_s")
_IN_MEMORY_MAX_ROWS = 100_000

# How long a writer waits for another process's write lock before failing.
_BUSY_TIMEOUT_S = 30.0


def _quote(name: str) -> str:
    return f'"{name}"'


class Ledger:
    """A durable record of calls: time, ids, user, session, tags, model, backend,
    input/output/cached tokens, cost, latency, stop reason and error.

    ``path=None`` keeps the ledger in memory, holding at most ``max_rows`` rows (the
    oldest are dropped first); a file ledger keeps every row. Safe to share between
    threads; every process opens its own connection to the same file.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_rows: int | None = None) -> None:
        self.path: Path | None = Path(path) if path is not None else None
        if max_rows is None and self.path is None:
            max_rows = _IN_MEMORY_MAX_ROWS
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._writes = 0
        self._connect()

    # -- connection -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross a fork: a child opens its own.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        target = ":memory:" if self.path is None else str(self.path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            target, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        if self.path is not None:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed row survives a process crash; only a power
            # loss can drop the last transactions. That is the trade SQLite recommends.
            conn.execute("PRAGMA synchronous=NORMAL")
        cols = ", ".join(f'"{name}" {sql}' for name, sql in COLUMNS.items())
        conn.execute(f"CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, {cols})")
        have = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
        for name, sql in COLUMNS.items():
            if name not in have:
                default_sql = sql.replace("NOT NULL", "") if "DEFAULT" not in sql else sql
                conn.execute(f'ALTER TABLE calls ADD COLUMN "{name}" {default_sql}')
        conn.execute("CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts)")
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this process's connection; a later call opens it again."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path) if self.path else None!r})"

    # -- writing ------------------------------------------------------------------------

    def write(self, row: Mapping[str, Any]) -> str:
        """Append one call's row and return its ``request_id``.

        Missing ``request_id`` and ``ts`` are filled in; ``tags`` may be any JSON value.
        Unknown keys raise ``KeyError`` rather than being silently dropped.
        """
        unknown = row.keys() - COLUMNS.keys()
        if unknown:
            raise KeyError(f"unknown ledger columns: {sorted(unknown)}")
        values = dict(row)
        values.setdefault("request_id", uuid.uuid4().hex)
        values.setdefault("ts", time.time())
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            values[name] = int(values.get(name) or 0)
        if values.get("tags") is not None:
            values["tags"] = json.dumps(values["tags"], sort_keys=True, default=str)
        names = list(values)
        sql = (
            f"INSERT INTO calls ({', '.join(map(_quote, names))}) "
            f"VALUES ({', '.join('?' * len(names))})"
        )
        with self._lock:
            conn = self._connect()
            conn.execute(sql, [values[n] for n in names])
            self._writes += 1
            if self.max_rows is not None and self._writes % 1024 == 0:
                self._evict(conn)
        return values["request_id"]

    def _evict(self, conn: sqlite3.Connection) -> None:
        assert self.max_rows is not None
        conn.execute(
            "DELETE FROM calls WHERE id <= (SELECT MAX(id) FROM calls) - ?", (self.max_rows,)
        )

    # -- reading ------------------------------------------------------------------------

    def _where(self, filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for key, value in filters.items():
            if key == "since":
                clauses.append("ts >= ?")
                args.append(value)
            elif key == "until":
                clauses.append("ts < ?")
                args.append(value)
            elif key in COLUMNS and key != "tags":
                if value is None:
                    clauses.append(f'"{key}" IS NULL')
                else:
                    clauses.append(f'"{key}" = ?')
                    args.append(value)
            else:
                raise TypeError(
                    f"unknown ledger filter {key!r}; use a column name, 'since' or 'until'"
                )
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        """Rows in write order, as dicts keyed by column name.

        Filters are equalities on columns (``user="alice"``, ``stop_reason="error"``;
        ``None`` matches NULL) plus ``since``/``until`` bounds on ``ts`` (epoch seconds).
        """
        where, args = self._where(filters)
        names = list(COLUMNS)
        sql = f"SELECT {', '.join(map(_quote, names))} FROM calls{where} ORDER BY id"
        with self._lock:
            rows = self._connect().execute(sql, args).fetchall()
        out = []
        for row in rows:
            record = dict(zip(names, row, strict=True))
            if record["tags"] is not None:
                record["tags"] = json.loads(record["tags"])
            out.append(record)
        return out

    def totals(self, **filters: Any) -> dict[str, Any]:
        """Sums of tokens, cost and latency over the matching rows, plus ``calls``.

        ``cost_usd`` is ``None`` when no matching row has a known cost.
        """
        where, args = self._where(filters)
        sums = ", ".join(f'SUM("{n}")' for n in _SUMMED)
        with self._lock:
            row = self._connect().execute(f"SELECT COUNT(*), {sums} FROM calls{where}", args).fetchone()
        result: dict[str, Any] = {"calls": row[0]}
        for name, value in zip(_SUMMED, row[1:], strict=True):
            result[name] = value if name in ("cost_usd",) else (value or 0)
        return result

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM calls").fetchone()[0]
