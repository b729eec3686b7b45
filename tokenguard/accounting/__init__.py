"""What calls cost and who may spend: usage and replies, budgets with atomic
reservations, the usage ledger, its reports and prices."""

from tokenguard.accounting.budget import Budget, Per, Reservation, Window, open_budget_store
from tokenguard.accounting.ledger import COLUMNS, Ledger
from tokenguard.accounting.pricing import Price, PriceSpec, Pricing, UnknownPriceWarning, context_window
from tokenguard.accounting.report import REPORT_KEYS, Report
from tokenguard.accounting.usage import Reply, Usage

__all__ = [
    "COLUMNS",
    "REPORT_KEYS",
    "Budget",
    "Ledger",
    "Per",
    "Price",
    "PriceSpec",
    "Pricing",
    "Reply",
    "Report",
    "Reservation",
    "UnknownPriceWarning",
    "Usage",
    "Window",
    "context_window",
    "open_budget_store",
]
