"""Ledger rows in a Redis stream, which processes on many hosts append to while others
read. ``Ledger("redis://host:6379/0")`` selects it.

The keys (all under the prefix)::

    ledger            stream  one entry per row: ``row`` -> the row's columns as JSON
    ledger-ids        hash    request_id -> the entry id of its (first) row, trimmed
                              with the stream
    ledger-ids-dup    set     request_ids written more than once (looked up by a scan)
    ledger-ids-from   string  the id of the first row indexed: older rows (written
                              before the index existed) are found by a scan of those only
"""

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

# Index entries of trimmed rows an append deletes at most (one, unless max_rows was
# lowered: the index entries of the rest are dropped when a lookup finds them gone).
_TRIM_BATCH = 1000

# KEYS: stream, the append's token, ledger-ids, ledger-ids-dup, ledger-ids-from. ARGV: the
# row's JSON, maxlen ('' none), token ttl (ms), the row's request_id, trim batch.
# The token makes a repeated append (redis-py retries after a dropped reply) a no-op, so
# a row is written once however often the client sends it.
_APPEND = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return 0 end
local id
if ARGV[2] == '' then
  id = redis.call('XADD', KEYS[1], '*', 'row', ARGV[1])
else
  -- The rows this one pushes out leave the index with the stream.
  local over = redis.call('XLEN', KEYS[1]) + 1 - tonumber(ARGV[2])
  if over > 0 then
    local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', math.min(over, tonumber(ARGV[5])))
    for _, entry in ipairs(gone) do
      local ok, row = pcall(cjson.decode, entry[2][2])
      local request_id = ok and type(row) == 'table' and row.request_id
      if type(request_id) == 'string' and redis.call('HGET', KEYS[3], request_id) == entry[1] then
        redis.call('HDEL', KEYS[3], request_id)
      end
    end
  end
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'row', ARGV[1])
end
redis.call('SET', KEYS[5], id, 'NX')
if redis.call('HSETNX', KEYS[3], ARGV[4], id) == 0 then redis.call('SADD', KEYS[4], ARGV[4]) end
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
    O(rows), as in :class:`~tokenguard.stores.MemoryLedgerStore`, except ``select`` of
    one ``request_id`` alone (``Ledger.find``, which a budget asks about a dead
    process's call): O(1), from an index of request ids; ``count`` is O(1).
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
        self._ids, self._dups, self._ids_from = (f"{self.stream}-ids", f"{self.stream}-ids-dup",
                                                 f"{self.stream}-ids-from")
        self.redis = RedisConnection(parsed)
        self._append = self.redis.script(_APPEND)

    def append(self, row: Mapping[str, Any]) -> None:
        text = json.dumps({name: _as_stored(name, row[name]) for name in _NAMES}, separators=(",", ":"))
        token = f"{self.prefix}ledger-append:{uuid.uuid4().hex}"
        maxlen = "" if self.max_rows is None else self.max_rows
        keys = [self.stream, token, self._ids, self._dups, self._ids_from]
        args = [text, maxlen, _APPEND_TOKEN_TTL_MS, str(row["request_id"]), _TRIM_BATCH]
        self.redis.run(self._append, keys, args, "appending a row")

    def _rows(self, end: str = "+") -> Iterator[dict[str, Any]]:
        """Every row up to entry id ``end`` (``"(id"``: before it), oldest first, a page
        at a time."""
        start = "-"
        while True:
            with self.redis.errors("reading rows"):
                page = self.redis.client.xrange(self.stream, start, end, count=_PAGE)
            for _, fields in page:
                yield json.loads(fields["row"])
            if len(page) < _PAGE:
                return
            start = "(" + page[-1][0]  # after the last one read

    def select(self, query: LedgerQuery) -> list[dict[str, Any]]:
        request_id = query.equals.get("request_id")
        if isinstance(request_id, str) and list(query.equals) == ["request_id"] and query.since is None \
                and query.until is None:
            return self._select_call(request_id)
        return [row for row in self._rows() if query.matches(row)]

    def _select_call(self, request_id: str) -> list[dict[str, Any]]:
        """The rows of call ``request_id``, from the index: its row, or those of the rows
        written before the index existed that match (a scan of those only). One written
        more than once is found by a scan, as any other query."""
        query = LedgerQuery({"request_id": request_id})
        with self.redis.errors("finding a row"):
            pipe = self.redis.client.pipeline(transaction=False)
            pipe.hget(self._ids, request_id).sismember(self._dups, request_id).get(self._ids_from)
            entry_id, duplicated, indexed_from = pipe.execute()
            if duplicated:
                return [row for row in self._rows() if query.matches(row)]
            if entry_id is not None:
                found = self.redis.client.xrange(self.stream, entry_id, entry_id)
                if found:
                    return [json.loads(found[0][1]["row"])]
                self.redis.client.hdel(self._ids, request_id)  # trimmed since: gone with its row
                return []
        older = "+" if indexed_from is None else f"({indexed_from}"
        return [row for row in self._rows(older) if query.matches(row)]

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
