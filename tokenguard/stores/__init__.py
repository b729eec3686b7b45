"""Where budgets and the ledger (and later caches and sessions) keep their state.

Each store interface has the same methods in this process (``Memory*``), on one
machine (``SQLite*``, through the one :class:`SQLiteDatabase` helper) and, later, on
Redis, so a budget or a ledger moves between them by changing its ``store=``.
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
from tokenguard.stores.sqlite import SQLITE_SETTINGS, SQLiteDatabase, SQLiteSettings
from tokenguard.stores.sqlite_budget import SQLiteBudgetStore
from tokenguard.stores.sqlite_ledger import SQLiteLedgerStore

__all__ = [
    "LEDGER_COLUMNS",
    "SQLITE_SETTINGS",
    "BudgetStore",
    "LedgerQuery",
    "LedgerStore",
    "MemoryBudgetStore",
    "MemoryLedgerStore",
    "Refusal",
    "SQLiteBudgetStore",
    "SQLiteDatabase",
    "SQLiteLedgerStore",
    "SQLiteSettings",
    "check_reservation",
]
