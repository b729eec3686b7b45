"""Steps 5 and 8, reserve and settle: hold a call's worst case in every budget that
applies before the backend runs, then settle each hold to the actual use."""

from __future__ import annotations

from collections.abc import Sequence

from tokenguard.budget import Budget
from tokenguard.call import Call
from tokenguard.pricing import Pricing
from tokenguard.usage import Usage

__all__ = ["Reserve", "Settle"]


class Reserve:
    """Reserve exact input + ``max_output_tokens`` (priced) in each budget, or raise
    :class:`~tokenguard.BudgetExceeded` with nothing held."""

    def __init__(self, budgets: Sequence[Budget], pricing: Pricing) -> None:
        seen: set[tuple[int, str]] = set()
        for budget in budgets:
            ident = (id(budget.store), budget.name)
            if ident in seen:
                raise ValueError(
                    f"two budgets named {budget.name!r} share one store; give one of them name="
                )
            seen.add(ident)
        self.budgets = list(budgets)
        self.pricing = pricing

    def __call__(self, call: Call) -> None:
        input_tokens = call.count_input()
        worst_tokens = input_tokens + call.max_output_tokens
        needs_usd = any(b.usd is not None for b in self.budgets)
        worst_usd = (
            self.pricing.cost(call.model, input_tokens, call.max_output_tokens, warn=False)
            if needs_usd
            else 0.0
        )
        try:
            for budget in self.budgets:
                call.reservations.append(
                    budget.reserve(worst_tokens, worst_usd, user=call.user, session=call.session)
                )
        except BaseException:
            release(call)
            raise


def release(call: Call) -> None:
    """Drop every hold of ``call`` without spending."""
    for reservation in call.reservations:
        reservation.release()


class Settle:
    """Turn each hold into the call's actual tokens and cost (input + output)."""

    def __call__(self, call: Call, usage: Usage) -> None:
        for reservation in call.reservations:
            reservation.settle(usage.total_tokens, usage.cost_usd)
