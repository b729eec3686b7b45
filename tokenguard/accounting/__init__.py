"""What calls cost and who may spend: usage and replies, budgets with atomic
reservations, the usage ledger and prices."""

from tokenguard.accounting.budget import Budget, Per, Reservation, Window, open_budget_store
from tokenguard.accounting.ledger import COLUMNS, Ledger
from tokenguard.accounting.pricing import Price, PriceSpec, Pricing, UnknownPriceWarning
from tokenguard.accounting.usage import Reply, Usage

__all__ = [
    "COLUMNS",
    "Budget",
    "Ledger",
    "Per",
    "Price",
    "PriceSpec",
    "Pricing",
    "Reply",
    "Reservation",
    "UnknownPriceWarning",
    "Usage",
    "Window",
    "open_budget_store",
]
