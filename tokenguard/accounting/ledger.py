"""The usage ledger: one row per call, whatever became of the call.

``Ledger()`` keeps its rows in this process (bounded: the oldest go first), so that a
:class:`~tokenguard.Guard` always has one; ``Ledger("usage.sqlite")`` keeps every row
in a SQLite file (WAL) that many threads and processes append to while others read;
any :class:`~tokenguard.stores.LedgerStore` is accepted too.

>>> ledger = Ledger()
>>> request_id = ledger.write({"model": "gpt-4o", "input_tokens": 12, "output_tokens": 3})
>>> ledger.records(model="gpt-4o")[0]["input_tokens"]
12
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenguard.accounting.report import Moment, Report, as_timestamp, report_keys
from tokenguard.errors import ConfigError, InvalidRequest
from tokenguard.stores import (
    LEDGER_COLUMNS,
    LedgerQuery,
    LedgerStore,
    MemoryLedgerStore,
    RedisLedgerStore,
    SQLiteLedgerStore,
    is_redis_url,
)

__all__ = ["COLUMNS", "Ledger"]

#: The ledger's columns and their SQL types.
COLUMNS = LEDGER_COLUMNS
# Counts a row may leave out: written as 0.
_INTEGERS = tuple(name for name, sql in COLUMNS.items() if sql.startswith("INTEGER NOT NULL"))
_IN_MEMORY_MAX_ROWS = 100_000


# A row's values by column type: what reports add up and format must be numbers.
_REALS = tuple(name for name, sql in COLUMNS.items() if sql.startswith("REAL"))
_TEXTS = tuple(name for name, sql in COLUMNS.items() if sql.startswith("TEXT") and name != "tags")


def _checked(values: dict[str, Any]) -> None:
    """Refuse a row a report could not read (a cost as text, a time in milliseconds):
    the ledger keeps it for good, and every later report would fail on it. Numbers of
    other types (numpy's, a whole float) become Python ints and floats."""
    for name in _INTEGERS:
        value = values[name]
        if type(value) is int and value >= 0:  # the common case, without the numbers ABCs' cost
            continue
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
            value = int(float(value))
        if not isinstance(value, numbers.Integral) or value < 0:
            raise InvalidRequest(f"ledger column {name!r} takes a whole number >= 0, got {value!r}")
        values[name] = int(value)  # cached=True is 1
    for name in _REALS:
        value = values[name]
        if value is None or (type(value) is float and math.isfinite(value)):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InvalidRequest(f"ledger column {name!r} takes a finite number or None, got {value!r}")
        values[name] = float(value)
    for name in _TEXTS:
        value = values[name]
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"ledger column {name!r} takes text or None, got {value!r}")
        if value is not None and not value.isascii():  # half a UTF-16 pair (an error's quote) as "?": no store takes it
            values[name] = value.encode("utf-8", "replace").decode("utf-8")
    as_timestamp(values["ts"])  # epoch seconds within the years 1-9999


def _query(filters: Mapping[str, Any]) -> LedgerQuery:
    equals: dict[str, Any] = {}
    bounds: dict[str, float] = {}
    for key, value in filters.items():
        if key in ("since", "until"):
            moment = as_timestamp(value)  # epoch seconds, an ISO date or a datetime, as report() takes
            if moment is not None:
                bounds[key] = moment
        elif key in COLUMNS and key != "tags":
            equals[key] = value
        else:
            raise InvalidRequest(f"unknown ledger filter {key!r}; use a column name, 'since' or 'until'")
    return LedgerQuery(equals, bounds.get("since"), bounds.get("until"))


class Ledger:
    """A durable record of calls: time, ids, user, session, tags, model, backend,
    input/output/cached tokens, cost, latency, stop reason and error, and where the
    call sat in its call tree (``depth``, ``parent_id``, ``root_id``, ``scope``):
    ``records(root_id=...)`` is one whole tree of nested calls.

    ``store`` is ``None`` (in this process, at most ``max_rows`` rows, the oldest
    dropped first), a path to a SQLite file or a ``redis://`` URL (one ledger that
    several hosts write; every row kept unless ``max_rows`` is set), or a
    :class:`~tokenguard.stores.LedgerStore`. Safe to share between threads;
    every process opens its own connection to the same file.
    """

    def __init__(
        self, store: str | os.PathLike[str] | LedgerStore | None = None, *, max_rows: int | None = None
    ) -> None:
        if store is None:
            self.store: LedgerStore = MemoryLedgerStore(max_rows=max_rows or _IN_MEMORY_MAX_ROWS)
        elif is_redis_url(store):
            self.store = RedisLedgerStore(store, max_rows=max_rows)
        elif isinstance(store, (str, os.PathLike)):
            self.store = SQLiteLedgerStore(store, max_rows=max_rows)
        elif isinstance(store, LedgerStore):
            self.store = store
        else:
            raise ConfigError(f"a ledger store is None, a path or a LedgerStore, got {type(store).__name__}")

    @property
    def path(self) -> Path | None:
        """The SQLite file, for a file ledger."""
        return getattr(self.store, "path", None)

    def close(self) -> None:
        """Close this process's connection; a later call opens it again."""
        self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.store!r})"

    def write(self, row: Mapping[str, Any]) -> str:
        """Append one call's row and return its ``request_id``.

        Missing ``request_id`` and ``ts`` are filled in; ``tags`` may be any JSON value.
        Unknown keys raise :class:`~tokenguard.InvalidRequest` rather than being
        silently dropped.
        """
        unknown = row.keys() - COLUMNS.keys()
        if unknown:
            raise InvalidRequest(f"unknown ledger columns: {sorted(unknown)}")
        values = dict.fromkeys(COLUMNS)
        values.update(row)
        if values["request_id"] is None:
            values["request_id"] = uuid.uuid4().hex
        if values["ts"] is None:
            values["ts"] = time.time()
        for name in _INTEGERS:
            values[name] = values[name] or 0
        _checked(values)
        if values["tags"] is not None:
            values["tags"] = json.dumps(values["tags"], sort_keys=True, default=str)
        self.store.append(values)
        return str(values["request_id"])

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        """Rows in write order, as dicts keyed by column name.

        Filters are equalities on columns (``user="alice"``, ``stop_reason="error"``;
        ``None`` matches a missing value) plus ``since``/``until`` bounds on ``ts``
        (epoch seconds).
        """
        rows = self.store.select(_query(filters))
        for row in rows:
            if row["tags"] is not None:
                row["tags"] = json.loads(row["tags"])
        return rows

    def find(self, request_id: str) -> dict[str, Any] | None:
        """The row of call ``request_id`` (the first, were there two), or ``None``."""
        rows = self.store.select(LedgerQuery({"request_id": request_id}))
        if not rows:
            return None
        row = rows[0]
        if row["tags"] is not None:
            row["tags"] = json.loads(row["tags"])
        return row

    def totals(self, **filters: Any) -> dict[str, Any]:
        """Sums of tokens, cost and latency over the matching rows, plus ``calls``.

        ``cost_usd`` (``saved_usd``) is ``None`` when a matching row spent (saved) tokens
        at an unknown price, as in :meth:`report`: an unknown cost is never a smaller one.
        """
        totals = dict(self.store.totals(_query(filters)))
        unpriced, unpriced_savings = totals.pop("unpriced", 0), totals.pop("unpriced_savings", 0)
        result = {name: value if name == "cost_usd" else (value or 0) for name, value in totals.items()}
        if unpriced:
            result["cost_usd"] = None
        if unpriced_savings:
            result["saved_usd"] = None
        return result

    def report(
        self, by: str | Iterable[str] = "model", since: Moment = None, until: Moment = None, **filters: Any
    ) -> Report:
        """The calls grouped by ``by`` and summed: a :class:`~tokenguard.accounting.Report`.

        ``by`` is one or more of ``user``, ``session``, ``model``, ``backend``, ``tag``,
        ``day``, ``hour`` (UTC), ``depth``, ``stop_reason`` (a list or ``"user,model"``).
        ``since``/``until`` bound the calls' start to ``[since, until)``: epoch seconds,
        an ISO date or date-time (UTC unless it has an offset), a ``datetime`` or a
        ``date``. Other ``filters`` are column equalities, as for :meth:`records`.

        >>> ledger = Ledger()
        >>> _ = ledger.write({"user": "ann", "model": "gpt-4o", "input_tokens": 9, "cost_usd": 0.01})
        >>> [(row["user"], row["calls"], row["input_tokens"]) for row in ledger.report(by="user")]
        [('ann', 1, 9)]
        """
        keys = report_keys(by)  # checked before the ledger is read
        start, end = as_timestamp(since), as_timestamp(until)
        bounds = {name: value for name, value in (("since", start), ("until", end)) if value is not None}
        return Report.from_records(self.records(**filters, **bounds), keys, since=start, until=end)

    def __len__(self) -> int:
        return self.store.count()
