"""Chat histories in one SQLite file (WAL): kept across restarts, shared by processes."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenguard.stores.sqlite import SQLiteDatabase

__all__ = ["SQLiteSessionStore"]

Messages = list[dict[str, Any]]


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS sessions (session TEXT PRIMARY KEY, messages TEXT NOT NULL, used REAL NOT NULL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS sessions_used ON sessions(used)")


class SQLiteSessionStore:
    """Each session's messages and the time of its last use, one row per session.

    Reads and writes are whole-session transactions, so processes appending to one
    session do not lose each other's turns. The bounds (how many sessions, for how
    long) are the :class:`~tokenguard.context.SessionHistory`'s: it calls
    :meth:`prune`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = SQLiteDatabase(path, _create)

    @property
    def path(self) -> Path | None:
        return self._db.path

    def load(self, session: str, *, used: float | None = None) -> tuple[Messages, float] | None:
        """The session's messages and last use, or ``None``; ``used`` marks it used now."""
        with self._db.transaction(write=used is not None) as conn:
            row = conn.execute("SELECT messages, used FROM sessions WHERE session = ?", (session,)).fetchone()
            if row is None:
                return None
            if used is not None:
                conn.execute("UPDATE sessions SET used = ? WHERE session = ?", (used, session))
        return json.loads(row[0]), row[1]

    def update(self, session: str, change: Callable[[Messages], Messages], used: float) -> Messages:
        """Replace the session's messages by ``change(messages)`` (``[]`` for a new
        session) in one transaction, and mark it used; the new messages come back."""
        with self._db.transaction() as conn:
            row = conn.execute("SELECT messages FROM sessions WHERE session = ?", (session,)).fetchone()
            messages = change(json.loads(row[0]) if row is not None else [])
            conn.execute(
                "INSERT INTO sessions (session, messages, used) VALUES (?, ?, ?) "
                "ON CONFLICT(session) DO UPDATE SET messages = excluded.messages, used = excluded.used",
                (session, json.dumps(messages), used),
            )
        return messages

    def delete(self, session: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE session = ?", (session,))

    def prune(self, *, unused_since: float | None, keep: int) -> list[str]:
        """Delete the sessions last used before ``unused_since`` and, beyond the ``keep``
        most recently used, the rest; the deleted sessions' names come back."""
        with self._db.transaction() as conn:
            gone: list[str] = []
            if unused_since is not None:
                gone += [r[0] for r in conn.execute("SELECT session FROM sessions WHERE used < ?", (unused_since,))]
                conn.execute("DELETE FROM sessions WHERE used < ?", (unused_since,))
            extra = conn.execute(
                "SELECT session FROM sessions ORDER BY used DESC LIMIT -1 OFFSET ?", (keep,)
            ).fetchall()
            if extra:
                gone += [r[0] for r in extra]
                conn.executemany("DELETE FROM sessions WHERE session = ?", extra)
        return gone

    def __len__(self) -> int:
        with self._db.connection() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteSessionStore({str(self.path)!r})"
