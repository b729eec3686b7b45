"""Chat histories in Redis: kept across restarts, shared by processes on many hosts.
``SessionHistory(path="redis://host:6379/0")`` selects it.

The keys (``prefix`` from the URL, default ``"tokenguard:"``)::

    <prefix>session:<session>            hash    m: the messages (JSON), v: the write that made them
    <prefix>sessions                     zset    session -> last use (the history's clock, seconds)
    <prefix>session-write:<token>        string  an update that landed; expires after 2 minutes

A session exists while its hash does; the sorted set orders sessions by last use, so
pruning the unused ones and all but the newest ``keep`` is a range on it. Every
operation is one Lua script, so the hash and the sorted set never disagree.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from tokenguard.errors import StoreError
from tokenguard.stores.redis_client import DEFAULT_PREFIX, RedisConnection, RedisURL

__all__ = ["RedisSessionStore"]

Messages = list[dict[str, Any]]

# How long an update's token stays: longer than any retry of that update can come.
_WRITE_TOKEN_TTL_MS = 120_000
# Attempts of one update that other writers keep changing under it, and the longest
# pause between two (jittered, doubling from 1 ms).
_UPDATE_ATTEMPTS = 200
_MAX_BACKOFF_S = 0.05
# Sessions one prune script deletes at most: Redis runs nothing else while a script
# runs, so a large backlog is deleted in several short scripts.
_PRUNE_BATCH = 500

# KEYS: the session's hash, the index. ARGV: session, the use to mark ('' = none).
# Returns false for an unknown session, else {messages, last use before this one}.
_LOAD = """
local messages = redis.call('HGET', KEYS[1], 'm')
if not messages then return false end
local used = redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0'
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
return {messages, used}
"""

# KEYS: the session's hash, the index, this write's token. ARGV: session, the write
# read before ('' = no session then), the new messages, the new write's id, the use,
# the token's TTL (ms).
# Returns 1 when the write is in (now, or by an earlier send of this same write: a retry
# after a lost reply), 0 when another write came between the read and this one.
_UPDATE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
local current = redis.call('HGET', KEYS[1], 'v') or ''
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'm', ARGV[3], 'v', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])
return 1
"""

# KEYS: the session's hash, the index. ARGV: session.
_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: the index. ARGV: the hashes' key prefix, unused since ('' = no limit), keep,
# batch. Deletes up to a batch of sessions (those last used before "unused since",
# then the least recently used beyond "keep") and returns their names.
_PRUNE = """
local gone = {}
if ARGV[2] ~= '' then
  gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
end
local room = tonumber(ARGV[4]) - #gone
if room > 0 then
  local extra = redis.call('ZCARD', KEYS[1]) - #gone - tonumber(ARGV[3])
  if extra > 0 then
    -- The oldest first; those already chosen are the oldest of all, so skip them.
    local older = redis.call('ZRANGE', KEYS[1], #gone, #gone + math.min(extra, room) - 1)
    for _, session in ipairs(older) do gone[#gone + 1] = session end
  end
end
for _, session in ipairs(gone) do
  redis.call('DEL', ARGV[1] .. session)
  redis.call('ZREM', KEYS[1], session)
end
return gone
"""


class RedisSessionStore:
    """Each session's messages and the time of its last use, in Redis: the methods
    and the answers of :class:`~tokenguard.stores.SQLiteSessionStore`, for processes
    on many hosts.

    :meth:`update` is an optimistic read-modify-write: it reads the session, computes
    ``change(messages)`` here, and a script writes the result only if no other write
    came in between (each write carries an id); otherwise it reads again and retries,
    so processes appending to one session never lose each other's turns. ``change``
    may therefore run more than once: it must only compute. A retry after a lost reply
    is recognised by the write's id and never applies a change twice.

    Fails closed: a server that cannot be reached raises
    :class:`~tokenguard.stores.StoreUnavailable` (a :class:`~tokenguard.StoreError`).
    ``prefix`` overrides the URL's (one tenant per prefix). Needs Redis >= 6.2; not
    Redis Cluster (a prune deletes sessions it finds in the index).
    """

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        parsed = RedisURL.parse(url)
        self.prefix = prefix if prefix is not None else parsed.prefix if parsed.prefix is not None else DEFAULT_PREFIX
        self.index = f"{self.prefix}sessions"
        self.redis = RedisConnection(parsed)
        self._load = self.redis.script(_LOAD)
        self._update = self.redis.script(_UPDATE)
        self._delete = self.redis.script(_DELETE)
        self._prune = self.redis.script(_PRUNE)

    def _key(self, session: str) -> str:
        return f"{self.prefix}session:{session}"

    def load(self, session: str, *, used: float | None = None) -> tuple[Messages, float] | None:
        """The session's messages and last use, or ``None``; ``used`` marks it used now."""
        reply = self.redis.run(self._load, [self._key(session), self.index],
                               [session, "" if used is None else repr(float(used))], "loading a session")
        if not reply:
            return None
        return json.loads(reply[0]), float(reply[1])

    def update(self, session: str, change: Callable[[Messages], Messages], used: float) -> Messages:
        """Replace the session's messages by ``change(messages)`` (``[]`` for a new
        session) atomically, and mark it used; the new messages come back."""
        key = self._key(session)
        for attempt in range(_UPDATE_ATTEMPTS):
            with self.redis.errors("reading a session"):
                text, version = self.redis.client.hmget(key, "m", "v")
            messages = change(json.loads(text) if text is not None else [])
            write = uuid.uuid4().hex
            args: list[str | int | float] = [session, version or "", json.dumps(messages), write,
                                             repr(float(used)), _WRITE_TOKEN_TTL_MS]
            token = f"{self.prefix}session-write:{write}"
            if self.redis.run(self._update, [key, self.index, token], args, "updating a session"):
                return messages
            # Another write came first: read again, after a pause that grows with the
            # contention (jittered, so the writers spread out).
            time.sleep(random.uniform(0, min(_MAX_BACKOFF_S, 0.001 * 2**attempt)))
        raise StoreError(
            f"session {session!r} on {self.redis.url.display} changed under each of {_UPDATE_ATTEMPTS} attempts "
            "to update it"
        )

    def delete(self, session: str) -> None:
        self.redis.run(self._delete, [self._key(session), self.index], [session], "deleting a session")

    def prune(self, *, unused_since: float | None, keep: int) -> list[str]:
        """Delete the sessions last used before ``unused_since`` and, beyond the ``keep``
        most recently used, the rest; the deleted sessions' names come back."""
        gone: list[str] = []
        args: list[str | int | float] = [
            f"{self.prefix}session:", "" if unused_since is None else repr(float(unused_since)), keep, _PRUNE_BATCH,
        ]
        while True:
            batch = self.redis.run(self._prune, [self.index], args, "pruning sessions")
            gone += batch
            if len(batch) < _PRUNE_BATCH:
                return gone

    def __len__(self) -> int:
        with self.redis.errors("counting sessions"):
            return int(self.redis.client.zcard(self.index))

    def close(self) -> None:
        self.redis.close()

    def __repr__(self) -> str:
        return f"RedisSessionStore({self.redis.url.display!r}, prefix={self.prefix!r})"
