"""Where a :class:`~tokenguard.cache.SemanticCache` keeps its entries: the few operations
its logic needs, and the SQLite file that does them (:mod:`tokenguard.cache.redis_semantic`
does them in Redis).

An entry is a stored question, its embedding (float32 bytes), the answer (CachedAnswer
JSON) and an expiry, filed under a *group*: one partition (scope) and conversation.
Ids grow with every store, across groups, and are never reused, so a process that has
read a group's entries up to some id reads only the later ones next time. The store is
the truth shared by every process; each process's FAISS indexes follow it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tokenguard.stores.sqlite import SQLiteDatabase

if TYPE_CHECKING:
    import sqlite3

__all__ = ["GroupKey", "SQLiteSemanticEntries", "SemanticEntries", "StoredEntry"]


@dataclass(frozen=True, slots=True)
class GroupKey:
    """One group of entries: its ``partition`` (``user:alice``, ``session:s1``,
    ``global``) and ``digest``, of the partition and the conversation before the newest
    message; the digest alone names the group, the partition lets a store keep each
    partition's entries apart."""

    partition: str
    digest: str


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """What a hit reads of an entry: the question it answered and the answer's JSON."""

    question: str
    answer: str


class SemanticEntries(Protocol):
    """A semantic cache's entries. Reads and writes raise
    :class:`~tokenguard.StoreError` when the store fails; the cache turns that into a
    miss, or a write it logs and skips."""

    #: The store as messages name it: a file, ``:memory:`` or a Redis URL.
    name: str

    def add(self, group: GroupKey, question: str, vector: bytes, answer: str, ttl: float | None) -> int:
        """Store an entry (expiring ``ttl`` seconds from now, ``None``: never); its id."""
        ...

    def vectors(self, group: GroupKey, after: int) -> list[tuple[int, bytes | None]]:
        """The ids and vectors of the group's entries with ids above ``after``, by id. A
        vector comes back as ``None`` when its entry went meanwhile, and empty when it
        cannot be read; the caller skips both."""
        ...

    def get(self, group: GroupKey, entry_id: int) -> StoredEntry | None:
        """The entry, or ``None`` when it is gone (deleted, evicted or expired)."""
        ...

    def drop(self, group: GroupKey, ids: Sequence[int]) -> None:
        """Delete these entries of the group."""
        ...

    def evict(self, max_entries: int) -> list[tuple[str, int]]:
        """Delete the expired entries, then the oldest stored beyond ``max_entries``;
        the ``(group digest, id)`` of each."""
        ...

    def clear(self) -> None:
        """Delete every entry."""
        ...

    def __len__(self) -> int:
        """Entries stored and not expired."""
        ...

    def close(self) -> None: ...


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY AUTOINCREMENT, grp TEXT NOT NULL, "
        "question TEXT NOT NULL, vector BLOB NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL, expires REAL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS entries_grp ON entries(grp, id)")
    # Expiry is checked on every store: without this, a scan of the whole table.
    conn.execute("CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires) WHERE expires IS NOT NULL")


class SQLiteSemanticEntries:
    """The entries in one SQLite file (``path``; ``None``: a private in-memory
    database), one row each, shared by the processes that open the file. AUTOINCREMENT
    ids are never reused, even after a delete, and a writer holds the file alone while
    it commits, so ids become visible in order. The partition is part of the digest
    (and checked again in the stored answer), so rows keep only the digest."""

    def __init__(self, path: Path | None) -> None:
        self.db = SQLiteDatabase(path, _create)
        self.name = ":memory:" if path is None else str(path)

    def add(self, group: GroupKey, question: str, vector: bytes, answer: str, ttl: float | None) -> int:
        now = time.time()
        with self.db.connection() as conn:
            cursor = conn.execute(
                "INSERT INTO entries (grp, question, vector, answer, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
                (group.digest, question, vector, answer, now, None if ttl is None else now + ttl))
        return int(cursor.lastrowid or 0)

    def vectors(self, group: GroupKey, after: int) -> list[tuple[int, bytes | None]]:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT id, vector FROM entries WHERE grp = ? AND id > ? ORDER BY id",
                                (group.digest, after)).fetchall()
        return [(int(i), bytes(v)) for i, v in rows]

    def get(self, group: GroupKey, entry_id: int) -> StoredEntry | None:
        with self.db.connection() as conn:
            row = conn.execute("SELECT question, answer, expires FROM entries WHERE id = ? AND grp = ?",
                               (entry_id, group.digest)).fetchone()
        if row is None or (row[2] is not None and row[2] < time.time()):
            return None
        return StoredEntry(row[0], row[1])

    def drop(self, group: GroupKey, ids: Sequence[int]) -> None:
        with self.db.connection() as conn:
            conn.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])

    def evict(self, max_entries: int) -> list[tuple[str, int]]:
        now = time.time()
        with self.db.transaction() as conn:
            gone = conn.execute("SELECT grp, id FROM entries WHERE expires IS NOT NULL AND expires < ?",
                                (now,)).fetchall()
            extra = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] - len(gone) - max_entries
            if extra > 0:
                gone += conn.execute("SELECT grp, id FROM entries WHERE expires IS NULL OR expires >= ? "
                                     "ORDER BY id LIMIT ?", (now, extra)).fetchall()
            conn.executemany("DELETE FROM entries WHERE id = ?", [(i,) for _, i in gone])
        return [(str(digest), int(i)) for digest, i in gone]

    def clear(self) -> None:
        with self.db.connection() as conn:
            conn.execute("DELETE FROM entries")

    def __len__(self) -> int:
        with self.db.connection() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM entries WHERE expires IS NULL OR expires >= ?",
                                    (time.time(),)).fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"SQLiteSemanticEntries({self.name!r})"
