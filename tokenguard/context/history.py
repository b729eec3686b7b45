"""Chat history per session, for ``Guard.chat``: bounded in sessions and messages."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["SessionHistory"]


class SessionHistory:
    """Messages of each session, least recently used sessions evicted first.

    A session keeps at most ``max_messages``; beyond that its oldest turns go (a leading
    system message stays). Fitting history into a model's window is the fit step's job;
    this bound only keeps memory finite.
    """

    def __init__(self, max_sessions: int = 10_000, max_messages: int = 1_000) -> None:
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, session: str) -> list[dict[str, Any]]:
        """A copy of the session's messages (empty for a new session)."""
        with self._lock:
            messages = self._sessions.get(session)
            if messages is None:
                return []
            self._sessions.move_to_end(session)
            return list(messages)

    def append(self, session: str, *messages: dict[str, Any]) -> None:
        """Add messages to the end of the session's history."""
        with self._lock:
            history = self._sessions.setdefault(session, [])
            self._sessions.move_to_end(session)
            history.extend(messages)
            excess = len(history) - self.max_messages
            if excess > 0:
                start = 1 if history and history[0].get("role") == "system" else 0
                del history[start : start + excess]
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def clear(self, session: str) -> None:
        """Forget a session."""
        with self._lock:
            self._sessions.pop(session, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
