"""Budgets: limits on tokens and USD, enforced with atomic reservations.

A call first *reserves* its worst case (exact input + ``max_output_tokens``, priced),
atomically against everything already spent and reserved, and is refused with
:class:`~tokenguard.BudgetExceeded` before the backend runs when that does not fit.
After the call the reservation *settles* to the actual use, or is *released* on error.
Checking and spending are therefore one step: concurrent calls cannot overspend.

>>> budget = Budget(tokens=100)
>>> r = budget.reserve(60)
>>> r.settle(40)
>>> budget.spent()["tokens"]
40
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
import weakref
from collections.abc import Hashable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from tokenguard._settings import limit, token_count
from tokenguard.errors import BudgetExceeded, ConfigError, InvalidRequest, TokenGuardError
from tokenguard.stores import (
    BudgetStore,
    MemoryBudgetStore,
    MemoryLedgerStore,
    RedisBudgetStore,
    SQLiteBudgetStore,
    SQLiteLedgerStore,
    is_redis_url,
)
from tokenguard.stores.base import reservation_id as call_reservation_id

if TYPE_CHECKING:
    from tokenguard.accounting.ledger import Ledger

__all__ = ["Budget", "Per", "Reservation", "Window", "charge", "link_ledger", "open_budget_store"]

Per = Literal["global", "user", "session"]
Window = Literal["hour", "day", "month"]

_NANO = 1_000_000_000
# Window ids sort in time order within one window kind; the store relies on that.
_WINDOW_FORMAT: dict[str, str] = {"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}


def _nano(usd: float) -> int:
    return round(usd * _NANO)


def charge(tokens: int, usd: float | None) -> tuple[int, int] | None:
    """What a call that used ``tokens`` (input + output) and ``usd`` spends in a budget,
    as its store counts it: ``(tokens, nano_usd)``; ``None`` when it spent nothing, so
    its holds are released. The settle step decides by this, and so does a budget store
    settling a dead process's hold from the call's ledger row (:func:`link_ledger`)."""
    if tokens > 0 or usd:
        return int(tokens), _nano(usd or 0.0)
    return None


def _ledger_charge(ledger: Ledger, request_id: str) -> tuple[int, int] | None:
    """:func:`charge` of call ``request_id``'s ledger row; ``None`` without a row."""
    row = ledger.find(request_id)
    if row is None:
        return None
    return charge(int(row["input_tokens"] or 0) + int(row["output_tokens"] or 0), row["cost_usd"])


def _shared_key(ledger: Ledger) -> Hashable | None:
    """Which ledger this is, across the ledger objects a process builds on it; ``None``
    for one kept in this process, which never holds a dead process's rows."""
    store = ledger.store
    if isinstance(store, SQLiteLedgerStore):
        return None if store.path is None else ("sqlite", os.path.realpath(store.path))
    if isinstance(store, MemoryLedgerStore):
        return None
    return (type(store).__qualname__, repr(store))


def link_ledger(budgets: Iterable[Budget], ledger: Ledger) -> None:
    """Make the stores of ``budgets`` settle, rather than release, a dead process's hold
    whose call has a row in ``ledger`` (the process died after the meter step wrote the
    row and before the settle step): to :func:`charge` of that row, exactly what the
    settle step would have counted. The :class:`~tokenguard.Guard` links its ledger and
    its budgets; stores without ``add_settled_lookup`` (the in-process one: its
    process cannot die without it) and in-process ledgers are left alone."""
    key = _shared_key(ledger)
    if key is None:
        return
    lookup = functools.partial(_ledger_charge, ledger)
    for budget in budgets:
        add = getattr(budget.store, "add_settled_lookup", None)
        if add is not None:
            add(lookup, key=key)


_open_files: dict[str, BudgetStore] = {}
# The budgets using each shared store and not closed: the store closes with the last.
_open_users: dict[int, weakref.WeakSet[Budget]] = {}
_open_files_lock = threading.Lock()


def _shared_name(store: str | os.PathLike[str] | BudgetStore | None) -> str | None:
    """The name ``store`` is shared under in this process (its URL, or its file's real
    path); ``None`` for a store that is not shared that way."""
    if is_redis_url(store):
        return store
    if isinstance(store, (str, os.PathLike)):
        return os.path.realpath(os.fspath(store))
    return None


def open_budget_store(store: str | os.PathLike[str] | BudgetStore | None) -> BudgetStore:
    """What ``Budget(store=...)`` means: ``None`` -> a new :class:`MemoryBudgetStore`;
    a ``redis://`` URL -> this process's one :class:`RedisBudgetStore` for that URL;
    a path -> this process's one :class:`SQLiteBudgetStore` for that file; a store ->
    itself."""
    if store is None:
        return MemoryBudgetStore()
    name = _shared_name(store)
    if name is not None:
        with _open_files_lock:
            if name not in _open_files:
                _open_files[name] = RedisBudgetStore(name) if is_redis_url(store) else SQLiteBudgetStore(name)
            return _open_files[name]
    if isinstance(store, BudgetStore):
        return store
    raise ConfigError(f"store must be None, a path or a BudgetStore, got {type(store).__name__}")


class Reservation:
    """A budget's hold on a call's worst case. Settle it with the actual use, or release
    it; whichever comes first wins and the other becomes a no-op."""

    __slots__ = ("_done", "budget", "id", "key", "tokens", "usd")

    def __init__(self, budget: Budget, key: str, reservation_id: str, tokens: int, usd: float) -> None:
        self.budget = budget
        self.key = key
        self.id = reservation_id
        self.tokens = tokens
        self.usd = usd
        self._done = False

    def settle(self, tokens: int, usd: float | None = None) -> None:
        """Replace the hold with the actual ``tokens`` (input + output) and ``usd``."""
        if self._done:
            return
        self._done = True
        self.budget.store.settle(self.id, self.budget.name, self.key, int(tokens), _nano(usd or 0.0))

    def release(self) -> None:
        """Drop the hold; nothing is spent."""
        if self._done:
            return
        self._done = True
        self.budget.store.release(self.id)

    def __repr__(self) -> str:
        return f"<Reservation {self.budget.name} {self.key} tokens={self.tokens} usd={self.usd}>"


class Budget:
    """A limit on tokens (input + output) and/or USD, for everyone (``per="global"``),
    each user or each session, over all time or per UTC ``window``.

    ``store=None`` keeps the budget in this process; ``store="path.sqlite"`` shares it
    between processes on one machine, ``store="redis://host:6379/0"`` between hosts
    (any :class:`~tokenguard.stores.BudgetStore` is accepted too). Budgets in one store
    are told apart by ``name``; the default name is built from ``per``, ``window`` and
    the limited units, so two processes that create the same budget share it.
    """

    def __init__(
        self,
        tokens: int | None = None,
        usd: float | None = None,
        per: Per = "global",
        window: Window | None = None,
        store: str | os.PathLike[str] | BudgetStore | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if tokens is None and usd is None:
            raise ConfigError("a Budget needs tokens=, usd= or both")
        if tokens is not None:  # whole tokens (1e6 is one), 1.5 is a mistake
            whole = isinstance(tokens, float) and float(tokens).is_integer()
            tokens = token_count("a budget's tokens", int(tokens) if whole else tokens)
        if usd is not None:
            limit("a budget's usd", usd)
        if per not in ("global", "user", "session"):
            raise ConfigError(f'per must be "global", "user" or "session", got {per!r}')
        if window is not None and window not in _WINDOW_FORMAT:
            raise ConfigError(f'window must be None, "hour", "day" or "month", got {window!r}')
        self.tokens = tokens
        self.usd = usd
        self.per: Per = per
        self.window: Window | None = window
        self.store: BudgetStore = open_budget_store(store)
        self._shared = _shared_name(store) is not None
        self._closed = False
        if self._shared:
            self._use_shared()
        units = "+".join(u for u, v in (("tokens", tokens), ("usd", usd)) if v is not None)
        self.name = name or f"{per}/{window or 'all'}/{units}"
        self._limit_tokens = tokens
        self._limit_nano = None if usd is None else _nano(usd)

    def key(self, user: str | None = None, session: str | None = None, now: datetime | None = None) -> str:
        """The scope and window a call is counted in, e.g. ``"user:alice|2025-06-01"``.

        Calls without a user (or session) share one anonymous scope.
        """
        if self.per == "global":
            scope = "global"
        elif self.per == "user":
            scope = f"user:{user or ''}"
        else:
            scope = f"session:{session or ''}"
        if self.window is None:
            return scope + "|"
        now = now or datetime.now(timezone.utc)
        return f"{scope}|{now.strftime(_WINDOW_FORMAT[self.window])}"

    def reserve(
        self,
        tokens: int,
        usd: float | None = None,
        *,
        user: str | None = None,
        session: str | None = None,
        request_id: str | None = None,
    ) -> Reservation:
        """Hold ``tokens`` and ``usd`` (the call's worst case) or raise
        :class:`~tokenguard.BudgetExceeded`. ``request_id`` names the call the hold is
        for (its ledger row's key; without ``#``): the hold's id is made from it, so a
        store can settle the hold from that row should this process die holding it
        (:func:`link_ledger`). ``usd=None`` means the price is unknown,
        which a USD budget refuses rather than guess. A per-user (per-session) budget
        refuses a call without a user (session) with :class:`~tokenguard.InvalidRequest`
        rather than pool every anonymous caller into one scope.
        """
        if (self.per == "user" and not user) or (self.per == "session" and not session):
            raise InvalidRequest(
                f"budget {self.name!r} is per {self.per}, but the call names no {self.per}: pass "
                f"{self.per}=... on the call, or make the budget per='global' to pool every caller"
            )
        if self.usd is not None and usd is None:
            raise TokenGuardError(
                f"budget {self.name!r} limits USD but the model's price is unknown; "
                "set prices={model: (usd_per_mtok_in, usd_per_mtok_out)} on the Guard"
            )
        if self._closed:  # used again after close: the shared store must stay open for it
            self._use_shared()
        key = self.key(user, session)
        reservation_id = uuid.uuid4().hex if request_id is None else call_reservation_id(request_id, self.name)
        refusal = self.store.reserve(
            reservation_id, self.name, key, int(tokens), _nano(usd or 0.0),
            self._limit_tokens, self._limit_nano,
        )
        if refusal is not None:
            if refusal.unit == "tokens":
                raise BudgetExceeded(self, key, "tokens", refusal.needed, refusal.left)
            raise BudgetExceeded(self, key, "usd", refusal.needed / _NANO, refusal.left / _NANO)
        return Reservation(self, key, reservation_id, int(tokens), usd or 0.0)

    def spent(self, *, user: str | None = None, session: str | None = None) -> dict[str, float]:
        """What the scope of ``user``/``session`` has spent and holds in the current
        window: ``{"tokens", "usd", "reserved_tokens", "reserved_usd"}``."""
        t, u, rt, ru = self.store.usage(self.name, self.key(user, session))
        return {"tokens": t, "usd": u / _NANO, "reserved_tokens": rt, "reserved_usd": ru / _NANO}

    def remaining(self, *, user: str | None = None, session: str | None = None) -> dict[str, float | None]:
        """What is left under each limit (``None`` where there is no limit)."""
        s = self.spent(user=user, session=session)
        return {
            "tokens": None if self.tokens is None else self.tokens - s["tokens"] - s["reserved_tokens"],
            "usd": None if self.usd is None else self.usd - s["usd"] - s["reserved_usd"],
        }

    def close(self) -> None:
        """Close the store's connections (a later call opens them again). On Redis it also
        stops renewing this process's holds: close a budget once its calls are done.

        The budgets of one path or URL share a store in a process: it closes when the
        last of them does (one collected unclosed counts as closed), so closing one
        never stops the renewal of another's holds. A store object you pass yourself is
        closed by each budget's ``close``."""
        if self._shared:
            with _open_files_lock:
                users = _open_users.setdefault(id(self.store), weakref.WeakSet())
                users.discard(self)
                self._closed = True
                if users:
                    return
        close = getattr(self.store, "close", None)  # a store of your own may hold nothing open
        if close is not None:
            close()

    def _use_shared(self) -> None:
        """Count this budget among its shared store's users (again, after a close)."""
        with _open_files_lock:
            _open_users.setdefault(id(self.store), weakref.WeakSet()).add(self)
            self._closed = False

    def __repr__(self) -> str:
        limits = ", ".join(f"{k}={v}" for k, v in (("tokens", self.tokens), ("usd", self.usd)) if v is not None)
        window = f", window={self.window!r}" if self.window else ""
        return f"Budget({limits}, per={self.per!r}{window})"
