"""KV kept between a chat session's turns, with TTL expiry and LRU eviction."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from tokenguard.errors import ConfigError


@dataclass(slots=True)
class KeptSession:
    """The tokens whose keys and values a finished turn left in ``blocks``."""

    tokens: list[int]
    blocks: list[int]
    last_used: float


class SessionStore:
    """Sessions by id, least recently used first. Only holds block ids; the engine
    releases the blocks of whatever this store hands back as evicted.
    """

    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ConfigError(f"session_ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._kept: OrderedDict[str, KeptSession] = OrderedDict()
        self._last_seen: dict[str, float] = {}  # every live session, kept KV or not

    def __len__(self) -> int:
        return len(self._last_seen)

    @property
    def num_kept(self) -> int:
        return len(self._kept)

    def is_open(self, session: str) -> bool:
        """Whether ``session`` was opened and has not ended (nor been dropped as expired:
        a session with a turn running never is)."""
        return session in self._last_seen

    def is_live(self, session: str) -> bool:
        """Whether ``session`` is open and within its TTL."""
        seen = self._last_seen.get(session)
        return seen is not None and time.monotonic() - seen <= self.ttl_s

    def touch(self, session: str) -> bool:
        """Mark ``session`` active now; False when it is unknown, ended or expired (even
        before the engine, busy, has dropped it)."""
        if not self.is_live(session):
            return False
        now = time.monotonic()
        self._last_seen[session] = now
        if session in self._kept:
            self._kept[session].last_used = now
            self._kept.move_to_end(session)
        return True

    def open(self, session: str) -> KeptSession | None:
        """A turn of ``session`` starts: its kept KV, which stays kept (the turn shares
        the blocks it reuses) until the turn ends and :meth:`keep` replaces it."""
        self._last_seen[session] = time.monotonic()
        self.touch(session)
        return self._kept.get(session)

    def keep(self, session: str, tokens: list[int], blocks: list[int]) -> list[int]:
        """A turn ended: keep its KV. Returns the blocks of the KV it replaces, which
        must be released."""
        now = time.monotonic()
        self._last_seen[session] = now
        previous = self._kept.pop(session, None)
        self._kept[session] = KeptSession(tokens, blocks, now)
        return previous.blocks if previous else []

    def end(self, session: str) -> list[int]:
        """Forget ``session``; returns the blocks to release."""
        self._last_seen.pop(session, None)
        kept = self._kept.pop(session, None)
        return kept.blocks if kept else []

    def expire(self, active: set[str]) -> list[int]:
        """Drop sessions idle longer than the TTL (not those with a turn running);
        returns the blocks to release."""
        deadline = time.monotonic() - self.ttl_s
        blocks: list[int] = []
        for session, seen in list(self._last_seen.items()):
            if seen < deadline and session not in active:
                blocks += self.end(session)
        return blocks

    def evict_lru(self) -> list[int]:
        """Give up the least recently used kept KV (memory pressure); [] when none."""
        if not self._kept:
            return []
        _, kept = self._kept.popitem(last=False)
        return kept.blocks

    def next_expiry(self) -> float | None:
        """Seconds until the next session may expire, or None without sessions."""
        if not self._last_seen:
            return None
        return max(0.0, min(self._last_seen.values()) + self.ttl_s - time.monotonic())
