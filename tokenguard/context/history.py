"""Chat history per session, for ``Guard.chat``: bounded in sessions, messages and time."""

from __future__ import annotations

import copy
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tokenguard._settings import seconds
from tokenguard.context.messages import is_instruction
from tokenguard.errors import ConfigError
from tokenguard.stores.redis_client import is_redis_url
from tokenguard.stores.redis_sessions import RedisSessionStore
from tokenguard.stores.sqlite_sessions import SQLiteSessionStore

__all__ = ["SessionHistory"]


def _bounded(history: list[dict[str, Any]], max_messages: int) -> list[dict[str, Any]]:
    """``history`` with its oldest messages gone beyond ``max_messages`` (a leading
    system message stays), and with them the results of tool calls that went (a result
    sent without its call is refused)."""
    excess = len(history) - max_messages
    if excess > 0:
        start = 1 if history and is_instruction(history[0]) else 0
        end = start + excess
        while end < len(history) and history[end].get("role") == "tool":
            end += 1
        del history[start:end]
    return history


class SessionHistory:
    """Messages of each session, least recently used sessions evicted first.

    A session keeps at most ``max_messages``; beyond that its oldest turns go (a leading
    system message stays). A session unused for ``ttl_s`` seconds expires (``None``:
    never); every read, append or :meth:`touch` is a use. Fitting history into a
    model's window is the fit step's job; these bounds only keep memory finite.
    ``on_expire(session)`` is called for each session that expires or is evicted (the
    guard frees what its backend keeps for it), outside the history's lock. ``clock``
    is where time comes from (``time.time``).

    ``path`` keeps the histories in a SQLite file (:class:`~tokenguard.stores.sqlite_sessions.SQLiteSessionStore`)
    as well: they survive a restart, and processes sharing the file share the
    sessions (each append is one transaction). The same bounds hold there: sessions
    unused for ``ttl_s`` and all but the ``max_sessions`` most recently used are deleted.
    A ``redis://`` URL keeps them in Redis instead
    (:class:`~tokenguard.stores.redis_sessions.RedisSessionStore`), shared by processes
    on many hosts; the URL's ``prefix`` separates tenants.
    """

    def __init__(
        self,
        max_sessions: int = 10_000,
        max_messages: int = 1_000,
        *,
        ttl_s: float | None = 3600.0,
        on_expire: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if max_sessions < 1 or max_messages < 1:
            raise ConfigError("max_sessions and max_messages must be >= 1")
        if ttl_s is not None:
            ttl_s = seconds("ttl_s", ttl_s)
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.ttl_s = ttl_s
        self.on_expire = on_expire
        self._clock = clock
        self._lock = threading.Lock()
        self._store: SQLiteSessionStore | RedisSessionStore | None = None
        if path is not None:
            self._store = RedisSessionStore(path) if is_redis_url(path) else SQLiteSessionStore(path)
        # session -> (messages, last use); least recently used first. With a store, the
        # sessions this process used (the store holds the messages that count).
        self._sessions: OrderedDict[str, tuple[list[dict[str, Any]], float]] = OrderedDict()

    @property
    def in_process(self) -> bool:
        """Whether the histories live in this process only (no SQLite file, no Redis):
        reading and writing them never waits on I/O."""
        return self._store is None

    def _expire(self, now: float, gone: list[str]) -> None:
        """Drop the sessions whose last use is older than the TTL, adding their names
        to ``gone``: they sit at the front (least recently used), so this costs what it
        drops."""
        if self.ttl_s is None:
            return
        while self._sessions:
            session, (_, used) = next(iter(self._sessions.items()))
            if now - used < self.ttl_s:
                return
            self._sessions.popitem(last=False)
            gone.append(session)

    def _forget(self, gone: list[str]) -> None:
        if self.on_expire is not None:
            for session in gone:
                self.on_expire(session)

    def _use(self, session: str, now: float) -> list[dict[str, Any]] | None:
        entry = self._sessions.get(session)
        if entry is None:
            return None
        self._sessions[session] = (entry[0], now)
        self._sessions.move_to_end(session)
        return entry[0]

    def get(self, session: str) -> list[dict[str, Any]]:
        """A copy of the session's messages (empty for a new or expired session), deep:
        what a caller or a backend changes in it is not the history's (a stored one is
        read anew each time)."""
        gone: list[str] = []
        with self._lock:
            now = self._clock()
            self._expire(now, gone)
            messages = self._load(session, now) if self._store is not None else self._use(session, now)
            copied = [] if messages is None else copy.deepcopy(messages)
        self._forget(gone)
        return copied

    def _load(self, session: str, now: float) -> list[dict[str, Any]] | None:
        """The session's messages from the store, marked used; ``None`` when it is
        unknown or expired there (then it is deleted)."""
        assert self._store is not None
        found = self._store.load(session, used=now)
        if found is None:
            return None
        messages, used = found
        if self.ttl_s is not None and now - used >= self.ttl_s:
            self._store.delete(session)
            return None
        self._sessions[session] = (messages, now)
        self._sessions.move_to_end(session)
        return messages

    def append(self, session: str, *messages: dict[str, Any]) -> None:
        """Add messages to the end of the session's history."""
        gone: list[str] = []
        with self._lock:
            now = self._clock()
            self._expire(now, gone)
            if self._store is not None:
                new = session not in self._sessions
                def add(old: list[dict[str, Any]]) -> list[dict[str, Any]]:
                    return _bounded(old + list(messages), self.max_messages)

                history = self._store.update(session, add, now)
                self._sessions[session] = (history, now)
                self._sessions.move_to_end(session)
                if new:  # the store's own bounds, across every process that shares it
                    unused_since = now - self.ttl_s if self.ttl_s is not None else None
                    self._store.prune(unused_since=unused_since, keep=self.max_sessions)
            else:
                history = self._use(session, now) or []
                self._sessions[session] = (_bounded(history + list(messages), self.max_messages), now)
            while len(self._sessions) > self.max_sessions:
                gone.append(self._sessions.popitem(last=False)[0])
        self._forget(gone)

    def touch(self, session: str) -> bool:
        """Keep ``session`` alive (a heartbeat); ``False`` when it is unknown or expired."""
        gone: list[str] = []
        with self._lock:
            now = self._clock()
            self._expire(now, gone)
            if self._store is not None:
                alive = self._load(session, now) is not None
            else:
                alive = self._use(session, now) is not None
        self._forget(gone)
        return alive

    def clear(self, session: str) -> None:
        """Forget a session."""
        with self._lock:
            self._sessions.pop(session, None)
            if self._store is not None:
                self._store.delete(session)

    def close(self) -> None:
        """Close the connection to the SQLite file or Redis (a later use opens it again)."""
        if self._store is not None:
            self._store.close()

    def __len__(self) -> int:
        gone: list[str] = []
        with self._lock:
            now = self._clock()
            self._expire(now, gone)
            if self._store is not None:
                self._store.prune(unused_since=now - self.ttl_s if self.ttl_s is not None else None,
                                  keep=self.max_sessions)
                size = len(self._store)
            else:
                size = len(self._sessions)
        self._forget(gone)
        return size
