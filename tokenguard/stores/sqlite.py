"""The one SQLite helper every SQLite store opens its file through.

Settings are data (:data:`SQLITE_SETTINGS`, one table), so the budget store, the ledger and later
the caches and sessions behave alike under contention: WAL, one busy timeout, one
fork rule (a connection never crosses a fork; the child opens its own).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenguard.errors import StoreError

__all__ = ["SQLITE_SETTINGS", "SQLiteDatabase", "SQLiteSettings"]


@dataclass(frozen=True, slots=True)
class SQLiteSettings:
    """How every tokenguard SQLite file is opened."""

    #: How long a writer waits for another process's write lock before it fails. Store
    #: transactions are short, so a long wait only happens under heavy contention.
    busy_timeout_s: float = 60.0
    #: WAL: readers never block the writer, and many processes share one file.
    journal_mode: str = "WAL"
    #: NORMAL: in WAL mode a committed transaction survives a process crash; only a
    #: power loss can drop the last ones. The trade SQLite itself recommends for WAL.
    synchronous: str = "NORMAL"


SQLITE_SETTINGS = SQLiteSettings()


def _set_journal_mode(conn: sqlite3.Connection, mode: str, timeout_s: float) -> None:
    """Switch the file to ``mode`` unless it is there already, retrying while another
    process holds a lock.

    Changing the journal mode needs the file to itself, and SQLite answers "database is
    locked" at once instead of waiting the busy timeout when several processes open a
    new file together; so this waits here, up to ``timeout_s``, with a growing pause.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != mode.lower():
                conn.execute(f"PRAGMA journal_mode={mode}")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class SQLiteDatabase:
    """One SQLite file (or, with ``path=None``, a private in-memory database), opened
    with :data:`SQLITE_SETTINGS` and shared by the threads of a process behind a lock.
    A file that cannot be opened or used raises :class:`~tokenguard.errors.StoreError`
    naming it.

    ``setup(connection)`` runs on every new connection (create tables, add columns):
    once per process, again after a fork or :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str] | None, setup: Callable[[sqlite3.Connection], None]) -> None:
        self.path: Path | None = None if path is None else Path(path)
        self._setup = setup
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self.connection():  # fail here, at construction, on a bad path
            pass

    @property
    def _name(self) -> str:
        """The file's path as errors name it, or ``:memory:``."""
        return ":memory:" if self.path is None else str(self.path)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            conn = self._open()
        except (sqlite3.Error, OSError) as error:
            raise StoreError(f"cannot open the SQLite file {self._name}: {error}") from error
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        """A new connection with the settings applied and ``setup`` run; closed again if
        either fails, so a bad file leaves nothing open."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._name,
            timeout=SQLITE_SETTINGS.busy_timeout_s,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE where it matters
            check_same_thread=False,
        )
        try:
            if self.path is not None:
                _set_journal_mode(conn, SQLITE_SETTINGS.journal_mode, SQLITE_SETTINGS.busy_timeout_s)
                conn.execute(f"PRAGMA synchronous={SQLITE_SETTINGS.synchronous}")
            self._setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn a SQLite error raised in the block (a busy timeout, a full disk) into a
        :class:`StoreError` naming this file; any other exception passes unchanged."""
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"the SQLite file {self._name} failed: {error}") from error

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, held for the ``with`` block (autocommit)."""
        with self._lock, self._errors():
            yield self._connect()

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: ``BEGIN IMMEDIATE`` when ``write`` (the write lock is taken
        before anything is read, so no other process can write between a check and the
        write it decides), a plain ``BEGIN`` for a consistent read. Rolled back on error."""
        with self._lock, self._errors():
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself after some errors
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection; a later use opens it again."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteDatabase({self._name!r})"
