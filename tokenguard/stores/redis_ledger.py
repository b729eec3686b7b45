"""Ledger rows in a Redis stream, which processes on many hosts append to while others
read. ``Ledger("redis://host:6379/0")`` selects it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from tokenguard.errors import ConfigError
from tokenguard.stores.base import LEDGER_COLUMNS, LEDGER_SUMMED, LedgerQuery, unpriced_counts
from tokenguard.stores.redis_client import DEFAULT_PREFIX, RedisConnection, RedisURL

__all__ = ["RedisLedgerStore"]

_NAMES = list(LEDGER_COLUMNS)
_AFFINITY = {name: sql.split()[0] for name, sql in LEDGER_COLUMNS.items()}
# Rows read per XRANGE round trip: bounded replies, few round trips.
_PAGE = 1000
# How long an append's token stays: longer than any retry of that append can come.
_APPEND_TOKEN_TTL_MS = 120_000

# KEYS: stream, the append's token. ARGV: the row's JSON, maxlen ('' none), token ttl (ms).
# The token makes a repeated append (redis-py retries after a dropped reply) a no-op, so
# a row is written once however often the client sends it.
_APPEND = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return 0 end
if ARGV[2] == '' then
  redis.call('XADD', KEYS[1], '*', 'row', ARGV[1])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'row', ARGV[1])
end
return 1
"""


def _as_stored(name: str, value: Any) -> Any:
    """``value`` as SQLite would give it back from the column's type, so a row reads
    the same from either store: an int in a REAL column comes back a float, an
    integral float in an INTEGER column an int, a bool a number."""
    if value is None or isinstance(value, str):
        return value
    kind = _AFFINITY[name]
    if kind == "REAL" and isinstance(value, (int, float)):
        return float(value)
    if kind == "INTEGER" and isinstance(value, (int, float)):
        return int(value) if isinstance(value, bool) or float(value).is_integer() else value
    return value


class RedisLedgerStore:
    """A :class:`~tokenguard.stores.LedgerStore` in one Redis stream,
    ``<prefix>ledger``: each row is one entry (its columns as JSON), in the order the
    server received them, whichever host wrote them.

    ``select`` and ``totals`` read the stream in pages and filter here, so they cost
    O(rows), as in :class:`~tokenguard.stores.MemoryLedgerStore`; ``count`` is O(1).
    Keeps every row unless ``max_rows`` is set, then the oldest go first. An append
    that Redis cannot take raises :class:`~tokenguard.stores.StoreUnavailable` (a row
    is never dropped silently; ``fail_open`` applies to budgets only).

    ``prefix`` overrides the URL's (default ``"tokenguard:"``): one tenant per prefix.
    """

    def __init__(self, url: str, *, prefix: str | None = None, max_rows: int | None = None) -> None:
        parsed = RedisURL.parse(url)
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
        self.prefix = prefix if prefix is not None else parsed.prefix if parsed.prefix is not None else DEFAULT_PREFIX
        self.max_rows = max_rows
        self.stream = f"{self.prefix}ledger"
        self.redis = RedisConnection(parsed)
        self._append = self.redis.script(_APPEND)

    def append(self, row: Mapping[str, Any]) -> None:
        text = json.dumps({name: _as_stored(name, row[name]) for name in _NAMES}, separators=(",", ":"))
        token = f"{self.prefix}ledger-append:{uuid.uuid4().hex}"
        maxlen = "" if self.max_rows is None else self.max_rows
        self.redis.run(self._append, [self.stream, token], [text, maxlen, _APPEND_TOKEN_TTL_MS], "appending a row")

    def _rows(self) -> Iterator[dict[str, Any]]:
        """Every row, oldest first, a page at a time."""
        start = "-"
        while True:
            with self.redis.errors("reading rows"):
                page = self.redis.client.xrange(self.stream, start, "+", count=_PAGE)
            for _, fields in page:
                yield json.loads(fields["row"])
            if len(page) < _PAGE:
                return
            start = "(" + page[-1][0]  # after the last one read

    def select(self, query: LedgerQuery) -> list[dict[str, Any]]:
        return [row for row in self._rows() if query.matches(row)]

    def totals(self, query: LedgerQuery) -> dict[str, Any]:
        calls = 0
        sums: dict[str, Any] = dict.fromkeys(LEDGER_SUMMED)
        unpriced = dict.fromkeys(("unpriced", "unpriced_savings"), 0)
        for row in self._rows():
            if not query.matches(row):
                continue
            calls += 1
            for name in LEDGER_SUMMED:
                if row[name] is not None:
                    sums[name] = row[name] if sums[name] is None else sums[name] + row[name]
            for name, count in unpriced_counts([row]).items():
                unpriced[name] += count
        return {"calls": calls, **sums, **unpriced}

    def count(self) -> int:
        with self.redis.errors("counting rows"):
            return int(self.redis.client.xlen(self.stream))

    def close(self) -> None:
        self.redis.close()

    def __repr__(self) -> str:
        return f"RedisLedgerStore({self.redis.url.display!r}, prefix={self.prefix!r})"
