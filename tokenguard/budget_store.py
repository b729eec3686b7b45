"""Where budgets keep their spend: the store interface and its implementations.

A store does one thing atomically: *check that a reservation fits under the limits
and record it*, in one step, so concurrent calls cannot all pass a check and then all
spend. Settling (reservation -> actual spend) and releasing are single steps too.

Amounts are integers (tokens and nano-USD), so sums are exact and a budget's spend
equals the sum of what it was settled with, whatever the order.

- :class:`MemoryStore`: one process, a lock.
- :class:`SQLiteStore`: many processes on one machine, ``BEGIN IMMEDIATE``.
- A Redis store implements the same four methods with a Lua script per method.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["BudgetStore", "MemoryStore", "Refusal", "SQLiteStore", "open_store"]

_BUSY_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation did not fit: the unit (``"tokens"`` or ``"nano_usd"``), what it
    needed and what was left under the limit."""

    unit: str
    needed: int
    left: int


@runtime_checkable
class BudgetStore(Protocol):
    """The four atomic operations a budget needs. ``budget`` names the budget, ``key``
    the scope and window (``"user:alice|2025-06-01"``); amounts are tokens and nano-USD.
    """

    def reserve(
        self,
        reservation_id: str,
        budget: str,
        key: str,
        tokens: int,
        nano_usd: int,
        limit_tokens: int | None,
        limit_nano_usd: int | None,
    ) -> Refusal | None:
        """Record the reservation if spent + reserved + it fits every limit; else refuse."""
        ...

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        """Turn the reservation into actual spend; ``False`` if it was already gone."""
        ...

    def release(self, reservation_id: str) -> bool:
        """Drop the reservation without spending; ``False`` if it was already gone."""
        ...

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        """``(spent_tokens, spent_nano_usd, reserved_tokens, reserved_nano_usd)``."""
        ...


def _check(
    spent_t: int, spent_u: int, res_t: int, res_u: int,
    tokens: int, nano_usd: int, limit_t: int | None, limit_u: int | None,
) -> Refusal | None:
    if limit_t is not None and spent_t + res_t + tokens > limit_t:
        return Refusal("tokens", tokens, limit_t - spent_t - res_t)
    if limit_u is not None and spent_u + res_u + nano_usd > limit_u:
        return Refusal("nano_usd", nano_usd, limit_u - spent_u - res_u)
    return None


class MemoryStore:
    """A budget store for one process: a dict behind a lock.

    Entries of finished windows are dropped once the store holds more than
    ``max_keys`` of them, oldest window first; the current window is never dropped.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # (budget, key) -> [spent_tokens, spent_nano_usd, reserved_tokens, reserved_nano_usd]
        self._totals: dict[tuple[str, str], list[int]] = {}
        self._reservations: dict[str, tuple[str, str, int, int]] = {}

    def reserve(
        self,
        reservation_id: str,
        budget: str,
        key: str,
        tokens: int,
        nano_usd: int,
        limit_tokens: int | None,
        limit_nano_usd: int | None,
    ) -> Refusal | None:
        with self._lock:
            entry = self._totals.get((budget, key))
            if entry is None:
                if len(self._totals) >= self.max_keys:
                    self._prune(budget, key)
                entry = self._totals[(budget, key)] = [0, 0, 0, 0]
            refusal = _check(*entry, tokens, nano_usd, limit_tokens, limit_nano_usd)
            if refusal is None:
                entry[2] += tokens
                entry[3] += nano_usd
                self._reservations[reservation_id] = (budget, key, tokens, nano_usd)
            return refusal

    def _prune(self, budget: str, current_key: str) -> None:
        # Keys end in "|<window id>"; a budget's ids sort by time ("" when it has no
        # window: never stale). Drop this budget's settled entries of older windows.
        window = current_key.rpartition("|")[2]
        stale = [
            k for k, v in self._totals.items()
            if k[0] == budget and v[2] == 0 and v[3] == 0 and "" < k[1].rpartition("|")[2] < window
        ]
        for k in stale:
            del self._totals[k]

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        with self._lock:
            held = self._reservations.pop(reservation_id, None)
            if held is None:
                return False
            entry = self._totals[(held[0], held[1])]
            entry[0] += tokens
            entry[1] += nano_usd
            entry[2] -= held[2]
            entry[3] -= held[3]
            return True

    def release(self, reservation_id: str) -> bool:
        with self._lock:
            held = self._reservations.pop(reservation_id, None)
            if held is None:
                return False
            entry = self._totals[(held[0], held[1])]
            entry[2] -= held[2]
            entry[3] -= held[3]
            return True

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        with self._lock:
            return tuple(self._totals.get((budget, key), (0, 0, 0, 0)))  # type: ignore[return-value]

    def __repr__(self) -> str:
        return "MemoryStore()"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    budget TEXT NOT NULL, key TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0, nano_usd INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, key)
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, budget TEXT NOT NULL, key TEXT NOT NULL,
    tokens INTEGER NOT NULL, nano_usd INTEGER NOT NULL,
    pid INTEGER NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_key ON reservations (budget, key);
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteStore:
    """A budget store that processes on one machine share through one SQLite file.

    Every operation is one ``BEGIN IMMEDIATE`` transaction: the write lock is taken
    *before* the check reads the totals, so no other process can reserve between the
    check and the insert. A reservation held by a process that died is reclaimed when
    a later reservation would otherwise be refused.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _totals(self, conn: sqlite3.Connection, budget: str, key: str) -> tuple[int, int, int, int]:
        spent = conn.execute(
            "SELECT tokens, nano_usd FROM spend WHERE budget = ? AND key = ?", (budget, key)
        ).fetchone() or (0, 0)
        held = conn.execute(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(nano_usd), 0) FROM reservations"
            " WHERE budget = ? AND key = ?",
            (budget, key),
        ).fetchone()
        return spent[0], spent[1], held[0], held[1]

    def _reap_dead(self, conn: sqlite3.Connection, budget: str, key: str) -> int:
        pids = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT pid FROM reservations WHERE budget = ? AND key = ?", (budget, key)
            )
        ]
        dead = [pid for pid in pids if pid != os.getpid() and not _pid_alive(pid)]
        for pid in dead:
            conn.execute("DELETE FROM reservations WHERE pid = ?", (pid,))
        return len(dead)

    def reserve(
        self,
        reservation_id: str,
        budget: str,
        key: str,
        tokens: int,
        nano_usd: int,
        limit_tokens: int | None,
        limit_nano_usd: int | None,
    ) -> Refusal | None:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                refusal = _check(
                    *self._totals(conn, budget, key), tokens, nano_usd, limit_tokens, limit_nano_usd
                )
                # Reclaiming is only worth its cost when it could turn a refusal around.
                if refusal is not None and self._reap_dead(conn, budget, key):
                    refusal = _check(
                        *self._totals(conn, budget, key), tokens, nano_usd, limit_tokens, limit_nano_usd
                    )
                if refusal is None:
                    conn.execute(
                        "INSERT INTO reservations (id, budget, key, tokens, nano_usd, pid, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (reservation_id, budget, key, tokens, nano_usd, os.getpid(), time.time()),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return refusal

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount
                if gone:
                    conn.execute(
                        "INSERT INTO spend (budget, key, tokens, nano_usd) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (budget, key) DO UPDATE SET"
                        " tokens = tokens + excluded.tokens, nano_usd = nano_usd + excluded.nano_usd",
                        (budget, key, tokens, nano_usd),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return bool(gone)

    def release(self, reservation_id: str) -> bool:
        with self._lock:
            conn = self._connect()
            return bool(conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount)

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN")
            try:
                return self._totals(conn, budget, key)
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection; a later call opens it again."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


_open: dict[str, SQLiteStore] = {}
_open_lock = threading.Lock()


def open_store(store: str | os.PathLike[str] | BudgetStore | None) -> BudgetStore:
    """``None`` -> a new :class:`MemoryStore`; a path -> the process's one
    :class:`SQLiteStore` for that file; a store -> itself."""
    if store is None:
        return MemoryStore()
    if isinstance(store, (str, os.PathLike)):
        path = os.path.realpath(os.fspath(store))
        with _open_lock:
            if path not in _open:
                _open[path] = SQLiteStore(path)
            return _open[path]
    if isinstance(store, BudgetStore):
        return store
    raise TypeError(f"store must be None, a path or a BudgetStore, got {type(store).__name__}")
