"""What the Redis stores share: their URL, their connection and how Redis errors read.

A ``redis://`` (or ``rediss://``, ``unix://``) URL selects a Redis store wherever a
budget store, a ledger path, a session history's path or an exact cache's directory is
accepted. Besides redis-py's own query options
(``socket_timeout``, ``ssl_cert_reqs``, ...) the URL may carry tokenguard's:

- ``prefix`` (default ``"tokenguard:"``): every key the stores write starts with it,
  so tenants sharing one Redis never see each other's budgets, ledger, sessions or
  cached answers;
- ``fail_open`` (budgets only, default ``false``): what a budget does while Redis
  cannot be reached, see :class:`~tokenguard.stores.RedisBudgetStore`;
- ``reservation_ttl_s`` (budgets only, default 60): how long a hold outlives the
  process that took it.

The ``redis`` package is imported when a Redis store is built, never by
``import tokenguard``; without it the store raises
:class:`~tokenguard.MissingDependency` naming ``pip install "tokenguard[redis]"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeGuard
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tokenguard.errors import ConfigError, MissingDependency, StoreError

__all__ = [
    "DEFAULT_PREFIX",
    "REDIS_INSTALL",
    "REDIS_SCHEMES",
    "RedisConnection",
    "RedisURL",
    "StoreUnavailable",
    "is_redis_url",
]

REDIS_INSTALL = 'pip install "tokenguard[redis]"'
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_PREFIX = "tokenguard:"

# Connection settings unless the URL says otherwise. A store fails within seconds when
# Redis is down (a budget then refuses or, fail-open, admits) rather than hanging a call.
_CONNECT_TIMEOUT_S = 2.0
_SOCKET_TIMEOUT_S = 5.0
# Retries of a command on a dropped connection or a timeout (the first command on a
# pooled connection that a Redis restart closed fails once). Every store operation is
# safe to repeat: the budget scripts are idempotent and a ledger append carries a token
# that makes a repeat a no-op.
_RETRIES = 3
# Pooled connections idle this long are pinged before use.
_HEALTH_CHECK_S = 30


class StoreUnavailable(StoreError):
    """A store's server cannot be reached (refused, timed out, dropped, still loading,
    rejected the credentials) or cannot take writes (a read-only replica, a server out
    of memory, one busy running another client's long script). The message
    names the server (never its password); the client's error is chained as the cause.

    A budget on Redis raises it by default, so a call is refused rather than run
    unmetered ("fail closed"); ``fail_open=True`` admits calls instead while the server
    is unreachable. It is a :class:`~tokenguard.StoreError`, so an ``OSError`` too.
    """


def is_redis_url(store: object) -> TypeGuard[str]:
    """Whether ``store`` is a string naming a Redis server rather than a file path."""
    return isinstance(store, str) and store.lower().startswith(REDIS_SCHEMES)


def _is_busy(error: Exception) -> bool:
    """Whether ``error`` is Redis's BUSY reply (another client's script or function has
    run past ``busy-reply-threshold``), which redis-py raises as a plain ResponseError."""
    return str(error).startswith("BUSY ")


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"the Redis URL option {name}={value!r} is not a boolean (use true or false)")


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A Redis store URL split into what redis-py connects with (``client_url``),
    tokenguard's own options, and ``display``: the URL without its password or query,
    for messages and reprs."""

    client_url: str
    display: str
    prefix: str | None
    fail_open: bool | None
    reservation_ttl_s: float | None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Split ``url``; :class:`~tokenguard.ConfigError` if it is not a Redis URL or
        one of tokenguard's options has a bad value."""
        if not is_redis_url(url):
            raise ConfigError(f"a Redis store URL starts with redis://, rediss:// or unix://, got {url!r}")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - parsing it raises on a bad one
        except ValueError as error:
            raise ConfigError(f"cannot read the Redis URL {url.split('@')[-1]!r}: {error}") from None
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not database.isdigit():
            raise ConfigError(f"the database of a Redis URL is a number (redis://host:6379/0), got {database!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {name: value for name, value in query if name in ("prefix", "fail_open", "reservation_ttl_s")}
        rest = [(name, value) for name, value in query if name not in ours]
        ttl: float | None = None
        if "reservation_ttl_s" in ours:
            try:
                ttl = float(ours["reservation_ttl_s"])
            except ValueError:
                raise ConfigError(
                    f"the Redis URL option reservation_ttl_s={ours['reservation_ttl_s']!r} is not a number"
                ) from None
        netloc = parts.netloc
        if "@" in netloc:  # keep the user name, hide the password
            credentials, _, host = netloc.rpartition("@")
            user = credentials.partition(":")[0]
            netloc = f"{user}:***@{host}" if ":" in credentials else f"{user}@{host}"
        return cls(
            client_url=urlunsplit(parts._replace(query=urlencode(rest))),
            display=urlunsplit((parts.scheme, netloc, parts.path, "", "")),
            prefix=ours.get("prefix"),
            fail_open=_flag("fail_open", ours["fail_open"]) if "fail_open" in ours else None,
            reservation_ttl_s=ttl,
        )


def import_redis() -> ModuleType:
    """The ``redis`` package, or :class:`~tokenguard.MissingDependency` naming the extra.

    Imported by name, never statically: neither ``import tokenguard`` nor the type check
    needs redis installed."""
    try:
        module = importlib.import_module("redis")
        for submodule in ("backoff", "exceptions", "retry"):
            importlib.import_module(f"redis.{submodule}")
        return module
    except ImportError:
        raise MissingDependency("the redis package (for redis:// stores)", REDIS_INSTALL) from None


class RedisConnection:
    """One Redis client (a thread-safe connection pool that a forked child replaces
    with its own) for one store, built from ``url`` with short timeouts and a few
    retries, answering in text. Nothing connects until the first command.

    :meth:`run` calls a Lua script (loaded once per server, then called by its SHA1
    with EVALSHA; redis-py loads it again if the server forgot it) and :meth:`errors`
    turns redis-py's exceptions into :class:`StoreUnavailable` (cannot reach the
    server) or :class:`~tokenguard.StoreError` (the server answered with an error).

    ``encoding_errors`` is how replies that are not UTF-8 decode (redis-py's option):
    ``"strict"`` raises; a store whose values others could have written (a cache)
    passes ``"replace"``, so such a value reads as text that fails its own parsing.
    """

    def __init__(self, url: RedisURL, *, encoding_errors: str = "strict") -> None:
        self.url = url
        self._redis = redis = import_redis()
        try:
            #: The ``redis.Redis`` client.
            self.client: Any = redis.Redis.from_url(
                url.client_url,
                decode_responses=True,
                encoding_errors=encoding_errors,
                socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_SOCKET_TIMEOUT_S,
                health_check_interval=_HEALTH_CHECK_S,
                retry=redis.retry.Retry(redis.backoff.EqualJitterBackoff(), _RETRIES),
            )
            # Build (not open) one connection now, so that an option redis-py does not
            # know fails here, as a ConfigError, instead of at the first call.
            pool = self.client.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"bad Redis URL {url.display}: {error}") from error

    def script(self, source: str) -> Any:
        """A script object for :meth:`run`; no round trip until it first runs."""
        return self.client.register_script(source)

    @contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Translate the redis-py errors raised in the block; ``doing`` says what the
        store was doing, for the message."""
        exceptions = self._redis.exceptions
        try:
            yield
        # A replica left behind by a failover (READONLY, MASTERDOWN), a full server
        # (OOM: maxmemory with noeviction) and one busy in another client's long script
        # (BUSY) cannot take the writes either: for a budget that is the same as no server.
        except (exceptions.ConnectionError, exceptions.TimeoutError, exceptions.ReadOnlyError,
                exceptions.MasterDownError) as error:
            raise StoreUnavailable(f"cannot reach the Redis server at {self.url.display} ({doing}): {error}") from error
        except exceptions.OutOfMemoryError as error:
            raise StoreUnavailable(f"the Redis server at {self.url.display} is full ({doing}): {error}") from error
        except exceptions.RedisError as error:
            if _is_busy(error):
                raise StoreUnavailable(f"the Redis server at {self.url.display} is busy ({doing}): {error}") from error
            raise StoreError(f"the Redis server at {self.url.display} failed ({doing}): {error}") from error

    def run(self, script: Any, keys: Sequence[str], args: Sequence[str | int | float], doing: str) -> Any:
        """Run ``script`` on ``keys`` and ``args``; its reply, with errors translated."""
        with self.errors(doing):
            return script(keys=list(keys), args=list(args), client=self.client)

    def close(self) -> None:
        """Close the pool's connections; the next command opens new ones."""
        self.client.connection_pool.disconnect()
