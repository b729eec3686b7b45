"""Stores that live in this process: dicts and a deque behind a lock."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from tokenguard.stores.base import LEDGER_SUMMED, LedgerQuery, Refusal, check_reservation, unpriced_counts

__all__ = ["MemoryBudgetStore", "MemoryLedgerStore"]


class MemoryBudgetStore:
    """A :class:`~tokenguard.stores.BudgetStore` for one process.

    Entries of finished windows are dropped once the store holds more than
    ``max_keys`` of them, oldest window first; the current window is never dropped.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # (budget, key) -> [spent_tokens, spent_nano_usd, reserved_tokens, reserved_nano_usd]
        self._totals: dict[tuple[str, str], list[int]] = {}
        self._reservations: dict[str, tuple[str, str, int, int]] = {}

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
        with self._lock:
            entry = self._totals.get((budget, key))
            if entry is None:
                if len(self._totals) >= self.max_keys:
                    self._prune(budget, key)
                entry = self._totals[(budget, key)] = [0, 0, 0, 0]
            refusal = check_reservation(entry, tokens, nano_usd, limit_tokens, limit_nano_usd)
            if refusal is None:
                entry[2] += tokens
                entry[3] += nano_usd
                self._reservations[reservation_id] = (budget, key, tokens, nano_usd)
            return refusal

    def _prune(self, budget: str, current_key: str) -> None:
        # Keys end in "|<window id>"; a budget's ids sort by time ("" when it has no
        # window: never stale). Drop this budget's settled entries of older windows.
        window = current_key.rpartition("|")[2]
        stale = [
            k
            for k, v in self._totals.items()
            if k[0] == budget and v[2] == 0 and v[3] == 0 and "" < k[1].rpartition("|")[2] < window
        ]
        for k in stale:
            del self._totals[k]

    def _drop(self, reservation_id: str) -> list[int] | None:
        """Remove a reservation's hold from its totals; the totals, or None if gone."""
        held = self._reservations.pop(reservation_id, None)
        if held is None:
            return None
        entry = self._totals[(held[0], held[1])]
        entry[2] -= held[2]
        entry[3] -= held[3]
        return entry

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        with self._lock:
            entry = self._drop(reservation_id)
            if entry is None:
                return False
            entry[0] += tokens
            entry[1] += nano_usd
            return True

    def release(self, reservation_id: str) -> bool:
        with self._lock:
            return self._drop(reservation_id) is not None

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        with self._lock:
            t, u, rt, ru = self._totals.get((budget, key), (0, 0, 0, 0))
            return t, u, rt, ru

    def __repr__(self) -> str:
        return "MemoryBudgetStore()"


class MemoryLedgerStore:
    """A :class:`~tokenguard.stores.LedgerStore` in this process: at most ``max_rows``
    rows, the oldest dropped first."""

    def __init__(self, *, max_rows: int = 100_000) -> None:
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: deque[dict[str, Any]] = deque(maxlen=max_rows)

    def append(self, row: Mapping[str, Any]) -> None:
        with self._lock:
            self._rows.append(dict(row))

    def select(self, query: LedgerQuery) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._rows if query.matches(row)]

    def totals(self, query: LedgerQuery) -> dict[str, Any]:
        with self._lock:
            rows = [row for row in self._rows if query.matches(row)]
        result: dict[str, Any] = {"calls": len(rows)}
        for name in LEDGER_SUMMED:
            values = [row[name] for row in rows if row[name] is not None]
            result[name] = sum(values) if values else None
        return {**result, **unpriced_counts(rows)}

    def count(self) -> int:
        with self._lock:
            return len(self._rows)

    def close(self) -> None:
        """Nothing is held open."""

    def __repr__(self) -> str:
        return f"MemoryLedgerStore(max_rows={self.max_rows})"
