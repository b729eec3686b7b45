"""A semantic cache's entries in Redis: ``SemanticCache("redis://host:6379/0")`` selects it.

Every process on every host that names the same server and prefix shares the entries;
each keeps its own FAISS index per group and reads, at each lookup, only the ids the
group gained since. The keys (``prefix`` from the URL, default ``"tokenguard:"``: one
tenant per prefix)::

    <prefix>semantic:<partition>:<group>:<id>   hash    q: question, v: vector (float32 bytes), a: answer JSON;
                                                        Redis expires it after the TTL
    <prefix>semantic:<partition>:<group>:ids    zset    the group's entry ids (score: the id)
    <prefix>semantic-index:order                zset    entry key -> id (oldest stored first)
    <prefix>semantic-index:expiry               zset    entry key -> expiry (ms, the server's clock), entries with a TTL
    <prefix>semantic-index:seq                  string  the last id given (never reset, so ids are never reused)

Keys start with their partition (``user:alice``, ``session:s1``, ``global``), so one
tenant's entries are one key range; ``<group>`` is the digest of partition and
conversation. Every write is one Lua script, so an id is in its group's set only once
its entry is complete, and always after every smaller id of that group.

**The bound.** After each store the expired entries leave the index, then the oldest
stored while more than ``max_entries`` are left. The server's ``maxmemory`` and its
eviction policy stay the operator's: an entry Redis evicts on its own is a miss, and
leaves the count when the order reaches it. Not Redis Cluster (a script touches an
entry, its group and the index, which live in different slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenguard.cache.redis_entries import expiry_ms
from tokenguard.cache.semantic_store import GroupKey, StoredEntry
from tokenguard.stores.redis_client import DEFAULT_PREFIX, RedisConnection, RedisURL, import_redis

__all__ = ["RedisSemanticEntries"]

# Entries one script or one pipeline handles at most: Redis runs nothing else while a
# script runs, and a group's first read fetches its vectors a batch per round trip.
_BATCH = 500

_COMMON = """
local order, expiry = KEYS[1], KEYS[2]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Delete an entry (<group>:<id>), its id in its group and its place in the index.
local function drop(entry)
  local group, id = string.match(entry, '^(.*):(%d+)$')
  redis.call('DEL', entry)
  if group then redis.call('ZREM', group .. ':ids', id) end
  redis.call('ZREM', order, entry)
  redis.call('ZREM', expiry, entry)
end
"""

# KEYS: order, expiry, seq. ARGV: the group's key (<prefix>semantic:<partition>:<group>),
# question, vector, answer, TTL in ms ('' = none). Returns the new entry's id.
_ADD = _COMMON + """
local id = redis.call('INCR', KEYS[3])
local entry = ARGV[1] .. ':' .. id
redis.call('HSET', entry, 'q', ARGV[2], 'v', ARGV[3], 'a', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('PEXPIRE', entry, ARGV[5])
  redis.call('ZADD', expiry, now_ms() + tonumber(ARGV[5]), entry)
end
redis.call('ZADD', ARGV[1] .. ':ids', id, id)
redis.call('ZADD', order, id, entry)
return id
"""

# KEYS: order, expiry. ARGV: max entries, batch. Deletes (up to a batch of) the expired
# entries, then (up to a batch of) the oldest beyond max entries; returns their keys.
_EVICT = _COMMON + """
local batch = tonumber(ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now_ms(), 'LIMIT', 0, batch)
for _, entry in ipairs(gone) do drop(entry) end
local extra = math.min(redis.call('ZCARD', order) - tonumber(ARGV[1]), batch)
if extra > 0 then
  for _, entry in ipairs(redis.call('ZRANGE', order, 0, extra - 1)) do
    drop(entry)
    table.insert(gone, entry)
  end
end
return gone
"""

# KEYS: order, expiry. ARGV: entry keys.
_DROP = _COMMON + """
for _, entry in ipairs(ARGV) do drop(entry) end
return 1
"""

# KEYS: order, expiry. ARGV: batch. Drops expired entries; returns {how many, entries left}.
_COUNT = _COMMON + """
local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
for _, entry in ipairs(gone) do drop(entry) end
return {#gone, redis.call('ZCARD', order)}
"""

# KEYS: order, expiry. ARGV: batch. Deletes up to a batch of entries; returns how many
# are left. The id sequence stays: a process still holding old ids must not see new
# entries under them.
_CLEAR = _COMMON + """
for _, entry in ipairs(redis.call('ZRANGE', order, 0, tonumber(ARGV[1]) - 1)) do drop(entry) end
local left = redis.call('ZCARD', order)
if left == 0 then redis.call('DEL', order, expiry) end
return left
"""


class RedisSemanticEntries:
    """The entries of one :class:`~tokenguard.cache.SemanticCache` in Redis (see the
    module's docstring for the keys and the bound): the
    :class:`~tokenguard.cache.semantic_store.SemanticEntries` operations.

    The server is pinged at construction, so an unreachable one is a
    :class:`~tokenguard.stores.StoreUnavailable` naming it there; later failures raise
    it (or :class:`~tokenguard.StoreError`) from the operation.
    """

    def __init__(self, url: str) -> None:
        parsed = RedisURL.parse(url)
        self.prefix = parsed.prefix if parsed.prefix is not None else DEFAULT_PREFIX
        # A value that is not UTF-8 (not written by a cache) reads as text that does not
        # parse: a corrupted entry, dropped, rather than a decoding error.
        self.redis = RedisConnection(parsed, encoding_errors="replace")
        self.name = self.redis.url.display
        # redis-py's per-command option to return a reply as bytes (the vectors) from a
        # client that otherwise decodes text.
        self._raw: dict[str, Any] = {import_redis().client.NEVER_DECODE: []}
        index = f"{self.prefix}semantic-index:"
        self._index = [f"{index}order", f"{index}expiry"]
        self._seq = f"{index}seq"
        self._add = self.redis.script(_ADD)
        self._evict = self.redis.script(_EVICT)
        self._drop = self.redis.script(_DROP)
        self._count = self.redis.script(_COUNT)
        self._clear = self.redis.script(_CLEAR)
        try:
            with self.redis.errors("connecting"):
                self.redis.client.ping()
        except BaseException:
            self.redis.close()
            raise

    def group_key(self, group: GroupKey) -> str:
        """The key every Redis key of ``group`` starts with."""
        return f"{self.prefix}semantic:{group.partition}:{group.digest}"

    def entry_key(self, group: GroupKey, entry_id: int) -> str:
        return f"{self.group_key(group)}:{entry_id}"

    def add(self, group: GroupKey, question: str, vector: bytes, answer: str, ttl: float | None) -> int:
        args = [self.group_key(group), question, vector, answer, expiry_ms(ttl)]
        with self.redis.errors("storing an answer"):  # not run(): its arguments are text, the vector is bytes
            return int(self._add(keys=[*self._index, self._seq], args=args, client=self.redis.client))

    def vectors(self, group: GroupKey, after: int) -> list[tuple[int, bytes | None]]:
        """The group's ids above ``after``, then their vectors a batch per round trip
        (``None``: gone since, expired or evicted; empty: the key is not a hash of ours)."""
        with self.redis.errors("reading a group's entries"):
            ids = [int(i) for i in self.redis.client.zrangebyscore(f"{self.group_key(group)}:ids", f"({after}", "+inf")]
            rows: list[tuple[int, bytes | None]] = []
            for start in range(0, len(ids), _BATCH):
                batch = ids[start : start + _BATCH]
                pipe = self.redis.client.pipeline(transaction=False)
                for entry_id in batch:
                    pipe.execute_command("HGET", self.entry_key(group, entry_id), "v", **self._raw)
                values = pipe.execute(raise_on_error=False)
                rows += [(i, v if v is None or isinstance(v, bytes) else b"")
                         for i, v in zip(batch, values, strict=True)]
        return rows

    def get(self, group: GroupKey, entry_id: int) -> StoredEntry | None:
        with self.redis.errors("reading a cache entry"):
            question, answer = self.redis.client.hmget(self.entry_key(group, entry_id), ["q", "a"])
        return None if question is None or answer is None else StoredEntry(str(question), str(answer))

    def drop(self, group: GroupKey, ids: Sequence[int]) -> None:
        keys = [self.entry_key(group, i) for i in ids]
        self.redis.run(self._drop, self._index, keys, "deleting answers")

    def evict(self, max_entries: int) -> list[tuple[str, int]]:
        gone = self.redis.run(self._evict, self._index, [max_entries, _BATCH], "evicting answers")
        evicted = []
        for key in gone:
            digest, entry_id = str(key).rsplit(":", 2)[1:]
            evicted.append((digest, int(entry_id)))
        return evicted

    def clear(self) -> None:
        """Delete every entry of this cache (its prefix), a batch per script."""
        while self.redis.run(self._clear, self._index, [_BATCH], "clearing the cache"):
            pass

    def __len__(self) -> int:
        """Entries stored and not expired (nor deleted by Redis's own eviction, which
        this count cannot see)."""
        while True:
            dropped, left = self.redis.run(self._count, self._index, [_BATCH], "counting answers")
            if int(dropped) < _BATCH:
                return int(left)

    def close(self) -> None:
        self.redis.close()

    def __repr__(self) -> str:
        return f"RedisSemanticEntries({self.name!r}, prefix={self.prefix!r})"
