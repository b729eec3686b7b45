"""Where budgets, the ledger and session histories keep their state.

Each store interface has the same methods in this process (``Memory*``), on one
machine (``SQLite*``, through the one :class:`SQLiteDatabase` helper) and across hosts
(``Redis*``, selected by a ``redis://`` URL; the ``redis`` package is imported only when
one is built), so a budget or a ledger moves between them by changing its ``store=``.
"""

from tokenguard.stores.base import (
    LEDGER_COLUMNS,
    BudgetStore,
    LedgerQuery,
    LedgerStore,
    Refusal,
    check_reservation,
)
from tokenguard.stores.memory import MemoryBudgetStore, MemoryLedgerStore
from tokenguard.stores.redis_budget import RedisBudgetStore
from tokenguard.stores.redis_client import StoreUnavailable, is_redis_url
from tokenguard.stores.redis_ledger import RedisLedgerStore
from tokenguard.stores.redis_sessions import RedisSessionStore
from tokenguard.stores.sqlite import SQLITE_SETTINGS, SQLiteDatabase, SQLiteSettings
from tokenguard.stores.sqlite_budget import SQLiteBudgetStore
from tokenguard.stores.sqlite_ledger import SQLiteLedgerStore
from tokenguard.stores.sqlite_sessions import SQLiteSessionStore

__all__ = [
    "LEDGER_COLUMNS",
    "SQLITE_SETTINGS",
    "BudgetStore",
    "LedgerQuery",
    "LedgerStore",
    "MemoryBudgetStore",
    "MemoryLedgerStore",
    "RedisBudgetStore",
    "RedisLedgerStore",
    "RedisSessionStore",
    "Refusal",
    "SQLiteBudgetStore",
    "SQLiteDatabase",
    "SQLiteLedgerStore",
    "SQLiteSessionStore",
    "SQLiteSettings",
    "StoreUnavailable",
    "check_reservation",
    "is_redis_url",
]
