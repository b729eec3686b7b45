"""An exact cache's entries in Redis: ``ExactCache("redis://host:6379/0")`` selects it.

Every process on every host that names the same server and prefix shares the entries.
The keys (``prefix`` from the URL, default ``"tokenguard:"``: one tenant per prefix)::

    <prefix>exact:<partition>:<key>    string  the entry (CachedAnswer JSON); Redis expires it after the TTL
    <prefix>exact-index:order          zset    entry key -> store sequence number (oldest stored first)
    <prefix>exact-index:expiry         zset    entry key -> expiry (ms, the server's clock), entries with a TTL
    <prefix>exact-index:size           hash    entry key -> bytes (key + value)
    <prefix>exact-index:bytes          string  the sum of those sizes
    <prefix>exact-index:seq            string  the last store sequence number

An entry's key starts with its partition (``user:alice``, ``session:s1``, ``global``),
so one tenant's entries are one key range; the entry key (a digest of partition and
request) and the partition stored in the answer keep partitions apart as on disk.

**The bound.** ``size_limit`` counts bytes as the diskcache does, with the same rule,
least recently stored first: each store adds the entry's key and value bytes, and
while the sum is over the limit the entry stored longest ago is deleted. An entry
larger than the whole limit is not stored. Expired entries leave the count at the next
store (or ``len``). Redis's own per-key overhead is not counted, and the server's
``maxmemory`` and its eviction policy stay the operator's: an entry Redis evicts on its
own is a miss, and is dropped from the count when the sequence reaches it.

Every write is one Lua script, so the index never disagrees with the entries.
"""

from __future__ import annotations

from tokenguard.stores.redis_client import DEFAULT_PREFIX, RedisConnection, RedisURL

__all__ = ["RedisEntries", "expiry_ms"]

# Index entries one script handles at most (expired ones dropped, or cleared): Redis
# runs nothing else while a script runs.
_BATCH = 1000
# The longest expiry sent (10**15 ms, some 31,700 years: as good as never): Redis refuses
# one whose end does not fit in 64 bits of milliseconds.
_MAX_TTL_MS = 10**15


def expiry_ms(ttl: float | None) -> int | str:
    """``ttl`` seconds as the scripts' expiry argument: milliseconds, at least 1 and at
    most :data:`_MAX_TTL_MS`; ``""`` for ``None`` (never expires)."""
    if ttl is None:
        return ""
    return max(1, round(min(ttl * 1000, _MAX_TTL_MS)))


_COMMON = """
local order, expiry, sizes, total = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Delete an entry and its place in the index.
local function drop(entry)
  local size = redis.call('HGET', sizes, entry)
  if size then redis.call('DECRBY', total, size) end
  redis.call('DEL', entry)
  redis.call('ZREM', order, entry)
  redis.call('ZREM', expiry, entry)
  redis.call('HDEL', sizes, entry)
end
-- Forget (up to a batch of) the entries whose TTL has passed; how many it did.
local function drop_expired(now, batch)
  local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, batch)
  for _, entry in ipairs(gone) do drop(entry) end
  return #gone
end
"""

# KEYS: the entry, order, expiry, size, bytes, seq. ARGV: the value, TTL in ms ('' =
# none), size limit (bytes), batch. Returns 1 when stored, 0 when larger than the limit.
_SET = _COMMON + """
local now = now_ms()
drop_expired(now, tonumber(ARGV[4]))
local entry, limit = KEYS[1], tonumber(ARGV[3])
local size = string.len(entry) + string.len(ARGV[1])
drop(entry)  -- an earlier value of the same entry, if any
if size > limit then return 0 end
if ARGV[2] == '' then
  redis.call('SET', entry, ARGV[1])
else
  redis.call('SET', entry, ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', expiry, now + tonumber(ARGV[2]), entry)
end
redis.call('ZADD', order, redis.call('INCR', KEYS[6]), entry)
redis.call('HSET', sizes, entry, size)
local used = redis.call('INCRBY', total, size)
while used > limit do
  local oldest = redis.call('ZRANGE', order, 0, 0)[1]
  if not oldest then break end
  drop(oldest)
  used = tonumber(redis.call('GET', total)) or 0
end
return 1
"""

# KEYS: the entry, order, expiry, size, bytes.
_DELETE = _COMMON + """
drop(KEYS[1])
return 1
"""

# KEYS: '', order, expiry, size, bytes. ARGV: batch. Drops expired entries; returns
# {how many it dropped, entries left}.
_COUNT = _COMMON + """
local dropped = drop_expired(now_ms(), tonumber(ARGV[1]))
return {dropped, redis.call('ZCARD', order)}
"""

# KEYS: '', order, expiry, size, bytes, seq. ARGV: batch. Deletes up to a batch of
# entries; returns how many are left.
_CLEAR = _COMMON + """
local entries = redis.call('ZRANGE', order, 0, tonumber(ARGV[1]) - 1)
for _, entry in ipairs(entries) do drop(entry) end
local left = redis.call('ZCARD', order)
if left == 0 then redis.call('DEL', order, expiry, sizes, total, KEYS[6]) end
return left
"""


class RedisEntries:
    """The entries of one :class:`~tokenguard.cache.ExactCache` in Redis (see the
    module's docstring for the keys and the size bound).

    Reads and writes raise :class:`~tokenguard.stores.StoreUnavailable` when the server
    cannot be reached and :class:`~tokenguard.StoreError` when it fails (both are
    ``OSError``): the cache turns them into a miss, or a write it logs and skips.
    Nothing connects before the first lookup. Not Redis Cluster (the scripts touch an
    entry and the index, which live in different slots).
    """

    def __init__(self, url: str, *, size_limit: int) -> None:
        parsed = RedisURL.parse(url)
        self.prefix = parsed.prefix if parsed.prefix is not None else DEFAULT_PREFIX
        self.size_limit = size_limit
        # A value that is not UTF-8 (not written by a cache) reads as text that does not
        # parse: a corrupted entry, dropped, rather than a decoding error.
        self.redis = RedisConnection(parsed, encoding_errors="replace")
        index = f"{self.prefix}exact-index:"
        self._index = [f"{index}order", f"{index}expiry", f"{index}size", f"{index}bytes"]
        self._seq = f"{index}seq"
        self._set = self.redis.script(_SET)
        self._delete = self.redis.script(_DELETE)
        self._count = self.redis.script(_COUNT)
        self._clear = self.redis.script(_CLEAR)

    @property
    def display(self) -> str:
        """The server's URL without password or options, for messages."""
        return self.redis.url.display

    def entry_key(self, partition: str, key: str) -> str:
        """The Redis key of the entry ``key`` of ``partition``."""
        return f"{self.prefix}exact:{partition}:{key}"

    def get(self, partition: str, key: str) -> str | None:
        with self.redis.errors("reading a cache entry"):
            value = self.redis.client.get(self.entry_key(partition, key))
        return None if value is None else str(value)

    def set(self, partition: str, key: str, value: str, ttl: float | None) -> bool:
        """Store ``value`` (expiring ``ttl`` seconds from now, ``None``: never), then
        delete the least recently stored entries while over the size limit; ``False``
        when the entry alone is over it (not stored)."""
        keys = [self.entry_key(partition, key), *self._index, self._seq]
        args = [value, expiry_ms(ttl), self.size_limit, _BATCH]
        return bool(self.redis.run(self._set, keys, args, "storing an answer"))

    def delete(self, partition: str, key: str) -> None:
        self.redis.run(self._delete, [self.entry_key(partition, key), *self._index], [], "deleting an answer")

    def clear(self) -> None:
        """Delete every entry of this cache (its prefix), a batch per script."""
        while self.redis.run(self._clear, ["", *self._index, self._seq], [_BATCH], "clearing the cache"):
            pass

    def __len__(self) -> int:
        """Entries stored and not expired (nor deleted by Redis's own eviction, which
        this count cannot see)."""
        while True:
            dropped, left = self.redis.run(self._count, ["", *self._index], [_BATCH], "counting answers")
            if int(dropped) < _BATCH:
                return int(left)

    def close(self) -> None:
        self.redis.close()

    def __repr__(self) -> str:
        return f"RedisEntries({self.display!r}, prefix={self.prefix!r})"
