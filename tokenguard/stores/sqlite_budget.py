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
    pid INTEGER NOT NULL, created REAL NOT NULL, pidns INTEGER
);
CREATE INDEX IF NOT EXISTS reservations_key ON reservations (budget, key);
CREATE TABLE IF NOT EXISTS released (id TEXT PRIMARY KEY, at REAL NOT NULL);
"""
# A process in another PID namespace (another container sharing the file) cannot be
# looked up by its pid: its hold is taken as dead only this long after it was made.
FOREIGN_HOLD_MAX_AGE_S = 3600.0
# How long the id of a hold released as dead is kept, so that its call, should it
# settle after all, still counts what it spent.
_RELEASED_KEPT_S = 86_400.0


def _create(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    if not _has_pidns(conn):  # a file from before holds said their PID namespace
        # Under the write lock, so that two processes opening it at once do not both add it.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not _has_pidns(conn):
                conn.execute("ALTER TABLE reservations ADD COLUMN pidns INTEGER")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _has_pidns(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "pidns" for row in conn.execute("PRAGMA table_info(reservations)"))


def _pid_namespace() -> int | None:
    """This process's PID namespace (Linux: the inode of /proc/self/ns/pid), else None."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


_PIDNS = _pid_namespace()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_dead(pid: int, pidns: int | None, created: float) -> bool:
    """Whether the process that took a hold has ended: by its pid in this PID namespace
    (a hold from before namespaces were recorded counts as this one's); past
    :data:`FOREIGN_HOLD_MAX_AGE_S` in another."""
    if pidns is not None and _PIDNS is not None and pidns != _PIDNS:
        return time.time() - created > FOREIGN_HOLD_MAX_AGE_S
    return pid != os.getpid() and not _pid_alive(pid)


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
    """Reclaim the reservations of processes that died holding them; how many holds.

    A hold whose call has a ledger row that spent (one of ``lookups`` finds it) is
    settled to that row's amount, as the dead process's settle step would have: the
    kill fell between the meter step, which commits the row, and the settle step. Any
    other hold is released, its id kept a day (a holder taken for dead that settles
    after all still counts its spend); one whose lookup failed is kept, for a later reclaim.
    """
    holders = conn.execute(
        "SELECT pid, pidns, MIN(created) FROM reservations WHERE budget = ? AND key = ? GROUP BY pid, pidns",
        (budget, key),
    ).fetchall()
    reclaimed = 0
    for pid, pidns, oldest in holders:
        if not _holder_dead(pid, pidns, oldest):
            continue
        held = conn.execute(
            "SELECT id, budget, key, created FROM reservations WHERE pid = ? AND pidns IS ?", (pid, pidns)
        ).fetchall()
        for reservation_id, its_budget, its_key, created in held:
            if not _holder_dead(pid, pidns, created):
                continue
            spent = lookups.spent_by(reservation_id)
            if spent is SettledLookups.UNKNOWN:
                continue
            if isinstance(spent, tuple):
                _add_spend(conn, its_budget, its_key, int(spent[0]), int(spent[1]))
            else:
                conn.execute("INSERT OR REPLACE INTO released (id, at) VALUES (?, ?)", (reservation_id, time.time()))
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            reclaimed += 1
    if reclaimed:
        conn.execute("DELETE FROM released WHERE at < ?", (time.time() - _RELEASED_KEPT_S,))
    return reclaimed


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
                    "INSERT INTO reservations (id, budget, key, tokens, nano_usd, pid, pidns, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (reservation_id, budget, key, tokens, nano_usd, os.getpid(), _PIDNS, time.time()),
                )
            return refusal

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        """Replace the hold with the spend; a hold released as dead meanwhile (its
        process was alive after all) still counts it. False when neither was found."""
        with self.db.transaction() as conn:
            found = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount or (
                conn.execute("DELETE FROM released WHERE id = ?", (reservation_id,)).rowcount)
            if found:
                _add_spend(conn, budget, key, tokens, nano_usd)
            return bool(found)

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
