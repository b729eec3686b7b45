"""The store interfaces: what budgets and the ledger need from wherever they keep state.

Each interface has an in-process implementation (:mod:`~tokenguard.stores.memory`) and
a single-machine one on SQLite (:mod:`~tokenguard.stores.sqlite_budget`,
:mod:`~tokenguard.stores.sqlite_ledger`); a Redis implementation of the same methods
shares state between hosts. Amounts are integers (tokens and nano-USD), so sums are
exact whatever the order of the operations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "LEDGER_COLUMNS",
    "LEDGER_SUMMED",
    "UNPRICED_SQL",
    "BudgetStore",
    "LedgerQuery",
    "LedgerStore",
    "Refusal",
    "SettledLookup",
    "SettledLookups",
    "check_reservation",
    "request_id_of",
    "reservation_id",
    "unpriced_counts",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation did not fit: the unit (``"tokens"`` or ``"nano_usd"``), what it
    needed and what was left under the limit."""

    unit: str
    needed: int
    left: int


def check_reservation(
    totals: Sequence[int], tokens: int, nano_usd: int, limit_tokens: int | None, limit_nano_usd: int | None
) -> Refusal | None:
    """Whether a reservation fits next to ``totals`` = ``(spent_tokens, spent_nano_usd,
    reserved_tokens, reserved_nano_usd)``; every budget store decides with this."""
    spent_t, spent_u, held_t, held_u = totals
    if limit_tokens is not None and spent_t + held_t + tokens > limit_tokens:
        return Refusal("tokens", tokens, limit_tokens - spent_t - held_t)
    if limit_nano_usd is not None and spent_u + held_u + nano_usd > limit_nano_usd:
        return Refusal("nano_usd", nano_usd, limit_nano_usd - spent_u - held_u)
    return None


#: Asked, for a dead process's reservation, whether that call's ledger row was written:
#: ``lookup(request_id)`` -> ``(tokens, nano_usd)`` it spent, or ``None`` (no row, or a
#: row that spent nothing): the hold is then settled to that amount, else released.
SettledLookup = Callable[[str], tuple[int, int] | None]

_CALL_SEPARATOR = "#"


def reservation_id(request_id: str, budget: str) -> str:
    """The id of call ``request_id``'s hold in ``budget``: unique per call and budget,
    and :func:`request_id_of` reads the call back from it. ``request_id`` must not
    contain ``#`` (the guard's are hex)."""
    return f"{request_id}{_CALL_SEPARATOR}{budget}"


def request_id_of(reservation_id: str) -> str | None:
    """The call a reservation id was made for by :func:`reservation_id`; ``None`` for
    any other id (a hold taken with ``Budget.reserve`` outside a call)."""
    request_id, found, _ = reservation_id.partition(_CALL_SEPARATOR)
    return request_id if found and request_id else None


class SettledLookups:
    """The :data:`SettledLookup` s a budget store asks about the call of a dead process's
    hold, in the order added; one per ``key`` (default: the lookup itself), a later one
    replacing it, so guards built again on one ledger add no more."""

    #: What :meth:`spent_by` answers when no lookup found the call and one failed:
    #: whether the call spent is not known, so its hold is kept for a later try.
    UNKNOWN = object()

    def __init__(self) -> None:
        self._lookups: dict[Hashable, SettledLookup] = {}
        self._lock = threading.Lock()

    def add(self, lookup: SettledLookup, *, key: Hashable | None = None) -> None:
        with self._lock:
            self._lookups[lookup if key is None else key] = lookup

    def __len__(self) -> int:
        with self._lock:
            return len(self._lookups)

    def spent_by(self, reservation_id: str) -> object:
        """What the call ``reservation_id`` was taken for spent, by the first lookup that
        finds its ledger row: ``(tokens, nano_usd)``; ``None`` when none finds one (or
        the id names no call); :attr:`UNKNOWN` when none finds one and a lookup failed."""
        request_id = request_id_of(reservation_id)
        with self._lock:
            lookups = list(self._lookups.values())
        if request_id is None or not lookups:
            return None
        failed = False
        for lookup in lookups:
            try:
                spent = lookup(request_id)
            except Exception:  # a ledger that cannot answer keeps the hold, never fails the call
                logger.warning("could not look up call %s in a ledger; its dead hold is kept", request_id,
                               exc_info=True)
                failed = True
                continue
            if spent is not None:
                return spent
        return self.UNKNOWN if failed else None


@runtime_checkable
class BudgetStore(Protocol):
    """The four atomic operations a budget needs. ``budget`` names the budget, ``key``
    the scope and window (``"user:alice|2025-06-01"``); amounts are tokens and nano-USD.

    ``reserve`` checks and records in one atomic step, so concurrent calls cannot all
    pass a check and then all spend; ``settle`` and ``release`` are single steps too.
    """

    def reserve(
        self,
        reservation_id: str,
        budget: str,
        key: str,
        tokens: int,
        nano_usd: int,
        limit_tokens: int | None,
        limit_nano_usd: int | None,
    ) -> Refusal | None:
        """Record the reservation if spent + reserved + it fits every limit; else refuse."""
        ...

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        """Turn the reservation into actual spend; ``False`` if it was already gone."""
        ...

    def release(self, reservation_id: str) -> bool:
        """Drop the reservation without spending; ``False`` if it was already gone."""
        ...

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        """``(spent_tokens, spent_nano_usd, reserved_tokens, reserved_nano_usd)``."""
        ...


# The ledger's schema as data: column -> SQL type. A column added here is added to
# existing ledger files when they are opened (ALTER TABLE), so old files keep working.
LEDGER_COLUMNS: dict[str, str] = {
    "request_id": "TEXT NOT NULL",
    "ts": "REAL NOT NULL",
    "user": "TEXT",
    "session": "TEXT",
    "model": "TEXT",
    "backend": "TEXT",
    "input_tokens": "INTEGER NOT NULL DEFAULT 0",
    "output_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cached_input_tokens": "INTEGER NOT NULL DEFAULT 0",
    "saved_tokens": "INTEGER NOT NULL DEFAULT 0",
    "saved_usd": "REAL",
    # The part of saved_tokens/saved_usd that context fitting and scope trimming spared.
    "context_saved_tokens": "INTEGER NOT NULL DEFAULT 0",
    "context_saved_usd": "REAL",
    "scope_saved_tokens": "INTEGER NOT NULL DEFAULT 0",
    "scope_saved_usd": "REAL",
    "cached": "INTEGER NOT NULL DEFAULT 0",  # 1: answered from a cache, the backend not called
    "cost_usd": "REAL",
    "latency_s": "REAL",
    "stop_reason": "TEXT",
    "tags": "TEXT",
    "error": "TEXT",
    # The call tree (nested guarded calls): 0 for a root call; the request_id of the
    # call it was made in and of its tree's root call (its own, for a root); the name
    # of the innermost tokenguard.scope() it ran in.
    "depth": "INTEGER NOT NULL DEFAULT 0",
    "parent_id": "TEXT",
    "root_id": "TEXT",
    "scope": "TEXT",
}
#: The columns :meth:`LedgerStore.totals` sums.
LEDGER_SUMMED = ("input_tokens", "output_tokens", "cached_input_tokens", "saved_tokens", "saved_usd",
                 "context_saved_tokens", "context_saved_usd", "scope_saved_tokens", "scope_saved_usd", "cost_usd",
                 "latency_s")


def unpriced_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``unpriced``: rows that spent tokens at an unknown price (no ``cost_usd``), and
    ``unpriced_savings``: rows that saved tokens at an unknown price (no ``saved_usd``).
    Their sums of USD are unknown, not the sum of the rest."""
    unpriced = unpriced_savings = 0
    for row in rows:
        unpriced += row["cost_usd"] is None and (row["input_tokens"] or 0) + (row["output_tokens"] or 0) > 0
        unpriced_savings += row["saved_usd"] is None and (row["saved_tokens"] or 0) > 0
    return {"unpriced": unpriced, "unpriced_savings": unpriced_savings}


#: The same, in SQL, for stores that sum there.
UNPRICED_SQL = ('SUM("cost_usd" IS NULL AND "input_tokens" + "output_tokens" > 0), '
                'SUM("saved_usd" IS NULL AND "saved_tokens" > 0)')


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    """Which ledger rows: column equalities (``None`` matches a missing value) and a
    half-open ``[since, until)`` range on ``ts`` (epoch seconds)."""

    equals: Mapping[str, Any] = field(default_factory=dict)
    since: float | None = None
    until: float | None = None

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether ``row`` is selected (for stores that filter in Python)."""
        ts = row["ts"]
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts >= self.until:
            return False
        return all(row.get(name) == value for name, value in self.equals.items())


@runtime_checkable
class LedgerStore(Protocol):
    """Where ledger rows live. Rows are dicts of :data:`LEDGER_COLUMNS` as stored:
    ``tags`` already encoded as JSON text, every column present."""

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one row after every earlier one."""
        ...

    def select(self, query: LedgerQuery) -> list[dict[str, Any]]:
        """The matching rows in write order."""
        ...

    def totals(self, query: LedgerQuery) -> dict[str, Any]:
        """``{"calls": n}`` plus the sum of each :data:`LEDGER_SUMMED` column over the
        matching rows (a sum over no known value is ``None``), and the rows priced at an
        unknown rate: :func:`unpriced_counts`."""
        ...

    def count(self) -> int:
        """How many rows the store holds."""
        ...

    def close(self) -> None:
        """Release what the store holds open; a later call opens it again."""
        ...
