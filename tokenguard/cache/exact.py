"""``ExactCache``: a byte-identical request gets the stored answer, at no token cost."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import diskcache

from tokenguard._settings import seconds
from tokenguard.cache.entry import CachedAnswer, worth_keeping
from tokenguard.cache.key import CacheScope, cached_partition, check_scope, digest, fingerprint
from tokenguard.cache.redis_entries import RedisEntries
from tokenguard.errors import ConfigError, StoreError
from tokenguard.stores.redis_client import is_redis_url

if TYPE_CHECKING:
    from tokenguard.accounting.usage import Reply
    from tokenguard.pipeline.call import Call

logger = logging.getLogger(__name__)


class ExactCache:
    """Answers of earlier calls, keyed by everything that changes the answer.

    ``path`` is a directory shared by every process and thread that opens it (diskcache:
    SQLite, ``shards`` files so concurrent writers rarely wait on each other); entries
    survive restarts. ``path=None`` keeps a private cache for this object only, in a
    temporary directory removed by :meth:`close` or at exit. ``ttl`` (seconds) expires
    entries; once the cache holds ``size_limit`` bytes the oldest-stored entries go first.

    A ``redis://`` URL as ``path`` keeps the entries in Redis instead
    (:mod:`tokenguard.cache.redis_entries`), shared by processes on every host that names
    the same server and ``prefix`` (a URL option, one tenant per prefix): the same keys
    and partitions, ``ttl`` as Redis expiry, and ``size_limit`` the same way (bytes of
    key and value, least recently stored first; the server's ``maxmemory`` stays the
    operator's). ``shards`` does not apply, and ``path`` is then ``None``.

    ``scope`` partitions entries: ``"user"`` (default: a reply is only served to the same
    ``user=``; calls without one share the anonymous partition), ``"session"`` (the same
    ``session=``; calls without a session are not cached) or ``"global"``. Only
    deterministic requests are cached - ``temperature=0``, or none given to a backend
    that decodes greedily by default - unless ``cache_sampled=True``.

    >>> guard = Guard(cache=ExactCache("~/.cache/myapp/answers"))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path | None = None, *, ttl: float | None = None, size_limit: int = 1 << 30,
                 scope: CacheScope = "user", cache_sampled: bool = False, shards: int = 8) -> None:
        if ttl is not None:  # finite, on disk and in Redis alike: None is "never expires"
            seconds("ttl", ttl)
        if size_limit < 1 or shards < 1:
            raise ConfigError(f"size_limit and shards must be positive, got {size_limit} and {shards}")
        self.scope = check_scope(scope)
        self.ttl = ttl
        self.cache_sampled = cache_sampled
        self._redis: RedisEntries | None = None
        self.path: Path | None = None
        self._cleanup: Callable[[], object] | None = None
        if is_redis_url(path):
            self._redis = RedisEntries(path, size_limit=size_limit)
            self._name = self._redis.display
            return
        directory = None if path is None else Path(path).expanduser()
        try:
            self._store = diskcache.FanoutCache(
                None if directory is None else str(directory), shards=shards, timeout=1.0, size_limit=size_limit,
                eviction_policy="least-recently-stored")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the cache directory {directory}: {e}") from e
        self.path = Path(self._store.directory)
        self._name = str(self.path)
        self._cleanup = (weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)
                         if directory is None else None)

    def key(self, call: Call) -> str | None:
        """The entry key of ``call``, or ``None`` when the call is not cacheable."""
        filed = self._filed(call)
        return None if filed is None else filed[1]

    def _filed(self, call: Call) -> tuple[str, str] | None:
        """``(partition, entry key)`` of ``call``, or ``None`` when it is not cacheable."""
        where = cached_partition(call, self.scope, self.cache_sampled)
        return None if where is None else (where, digest([where, fingerprint(call)]))

    def lookup(self, call: Call) -> Reply | None:
        """The stored answer to ``call`` as a zero-cost reply, or ``None``. An entry that
        cannot be read is a miss (logged as a warning and dropped), never an error."""
        filed = self._filed(call)
        if filed is None:
            return None
        where, key = filed
        try:
            data = self._store.get(key) if self._redis is None else self._redis.get(where, key)
        except (OSError, sqlite3.Error, diskcache.Timeout) as e:
            logger.warning("cache %s unreadable, treated as a miss: %s", self._name, e)
            return None
        if data is None:
            return None
        try:
            answer = CachedAnswer.loads(data)
        except ValueError as e:
            logger.warning("dropping a corrupted cache entry in %s: %s", self._name, e)
            if self._redis is None:
                self._store.delete(key)
            else:
                try:
                    self._redis.delete(where, key)
                except StoreError as error:  # the next store() replaces it anyway
                    logger.warning("could not drop it: %s", error)
            return None
        if answer.partition != where:
            return None  # never across partitions, whatever the key says
        return answer.reply(call)

    def store(self, call: Call, reply: Reply) -> None:
        """File ``reply`` as the answer to ``call`` when it is a complete, fresh answer to
        a cacheable request. A write that fails is logged, not raised: the reply stands."""
        filed = self._filed(call) if worth_keeping(reply) else None
        if filed is None:
            return
        where, key = filed
        answer = CachedAnswer.of(where, reply)
        try:
            if self._redis is None:
                self._store.set(key, answer.dumps(), expire=self.ttl)
            else:
                self._redis.set(where, key, answer.dumps(), self.ttl)
        except (OSError, sqlite3.Error, diskcache.Timeout) as e:
            logger.warning("could not write to cache %s: %s", self._name, e)

    def clear(self) -> None:
        """Remove every entry."""
        if self._redis is not None:
            self._redis.clear()
        else:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store) if self._redis is None else len(self._redis)

    def close(self) -> None:
        """Close the cache files (and remove a private cache's directory), or the
        connections to Redis."""
        if self._redis is not None:
            self._redis.close()
            return
        self._store.close()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> ExactCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExactCache({self._name!r}, scope={self.scope!r}, ttl={self.ttl!r})"
