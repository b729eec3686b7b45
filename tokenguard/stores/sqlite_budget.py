"""Budget spend in one SQLite file that the processes on a machine share."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Hashable
from pathlib import Path

from tokenguard.stores.base import Refusal, SettledLookup, SettledLookups, check_reservation
from tokenguard.stores.sqlite import SQLiteDatabase

__all__ = ["SQLiteBudgetStore"]

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


def _create(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _totals(conn: sqlite3.Connection, budget: str, key: str) -> tuple[int, int, int, int]:
    spent = conn.execute(
        "SELECT tokens, nano_usd FROM spend WHERE budget = ? AND key = ?", (budget, key)
    ).fetchone() or (0, 0)
    held = conn.execute(
        "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(nano_usd), 0) FROM reservations"
        " WHERE budget = ? AND key = ?",
        (budget, key),
    ).fetchone()
    return spent[0], spent[1], held[0], held[1]


def _add_spend(conn: sqlite3.Connection, budget: str, key: str, tokens: int, nano_usd: int) -> None:
    conn.execute(
        "INSERT INTO spend (budget, key, tokens, nano_usd) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (budget, key) DO UPDATE SET"
        " tokens = tokens + excluded.tokens, nano_usd = nano_usd + excluded.nano_usd",
        (budget, key, tokens, nano_usd),
    )


def _reap_dead(conn: sqlite3.Connection, budget: str, key: str, lookups: SettledLookups) -> int:
    """Reclaim the reservations of processes that died holding them; how many processes.

    A hold whose call has a ledger row that spent (one of ``lookups`` finds it) is
    settled to that row's amount, as the dead process's settle step would have: the
    kill fell between the meter step, which commits the row, and the settle step. Any
    other hold is released; one whose lookup failed is kept, for a later reclaim.
    """
    pids = [
        row[0]
        for row in conn.execute("SELECT DISTINCT pid FROM reservations WHERE budget = ? AND key = ?", (budget, key))
    ]
    dead = [pid for pid in pids if pid != os.getpid() and not _pid_alive(pid)]
    for pid in dead:
        held = conn.execute("SELECT id, budget, key FROM reservations WHERE pid = ?", (pid,)).fetchall()
        for reservation_id, its_budget, its_key in held:
            spent = lookups.spent_by(reservation_id)
            if spent is SettledLookups.UNKNOWN:
                continue
            if isinstance(spent, tuple):
                _add_spend(conn, its_budget, its_key, int(spent[0]), int(spent[1]))
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
    return len(dead)


class SQLiteBudgetStore:
    """A :class:`~tokenguard.stores.BudgetStore` that processes on one machine share
    through one SQLite file.

    Every operation is one ``BEGIN IMMEDIATE`` transaction: the write lock is taken
    *before* the check reads the totals, so no other process can reserve between the
    check and the insert. A reservation held by a process that died is reclaimed when
    a later reservation would otherwise be refused: settled to what its call's ledger
    row says the call spent, when a lookup added with :meth:`add_settled_lookup` finds
    that row (the process died between writing the row and settling), else released.
    So once dead holds are reclaimed, each budget's spend is what the ledger's rows say.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.db = SQLiteDatabase(path, _create)
        self._lookups = SettledLookups()

    def add_settled_lookup(self, lookup: SettledLookup, *, key: Hashable | None = None) -> None:
        """Ask ``lookup`` (see :data:`~tokenguard.stores.base.SettledLookup`) about the
        call of each dead process's hold this store reclaims: the hold is settled to
        what it returns, or released when no lookup knows the call. Lookups are asked
        in the order added; there is one per ``key`` (default: the lookup itself), a
        later one replacing it, so guards built again on one ledger add no more."""
        self._lookups.add(lookup, key=key)

    @property
    def path(self) -> Path:
        assert self.db.path is not None
        return self.db.path

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
        lookups = self._lookups
        with self.db.transaction() as conn:
            refusal = check_reservation(_totals(conn, budget, key), tokens, nano_usd, limit_tokens, limit_nano_usd)
            # Reclaiming is only worth its cost when it could turn a refusal around.
            if refusal is not None and _reap_dead(conn, budget, key, lookups):
                refusal = check_reservation(
                    _totals(conn, budget, key), tokens, nano_usd, limit_tokens, limit_nano_usd
                )
            if refusal is None:
                conn.execute(
                    "INSERT INTO reservations (id, budget, key, tokens, nano_usd, pid, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (reservation_id, budget, key, tokens, nano_usd, os.getpid(), time.time()),
                )
            return refusal

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        with self.db.transaction() as conn:
            gone = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount
            if gone:
                _add_spend(conn, budget, key, tokens, nano_usd)
            return bool(gone)

    def release(self, reservation_id: str) -> bool:
        with self.db.connection() as conn:
            return bool(conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount)

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        with self.db.transaction(write=False) as conn:
            return _totals(conn, budget, key)

    def close(self) -> None:
        """Close this process's connection; a later call opens it again."""
        self.db.close()

    def __repr__(self) -> str:
        return f"SQLiteBudgetStore({str(self.db.path)!r})"
