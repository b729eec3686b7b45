"""Step 5, reserve: hold a call's worst case in every budget that applies, before the
backend runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tokenguard.accounting import Budget, Pricing
from tokenguard.errors import ConfigError
from tokenguard.pipeline.call import Call

__all__ = ["Reserve"]

logger = logging.getLogger(__name__)


class Reserve:
    """Reserve exact input + ``max_output_tokens`` (priced) in each budget, or raise
    :class:`~tokenguard.BudgetExceeded` with nothing held."""

    def __init__(self, budgets: Sequence[Budget], pricing: Pricing) -> None:
        seen: set[tuple[int, str]] = set()
        for budget in budgets:
            ident = (id(budget.store), budget.name)
            if ident in seen:
                raise ConfigError(f"two budgets named {budget.name!r} share one store; give one of them name=")
            seen.add(ident)
        self.budgets = list(budgets)
        self.pricing = pricing

    def __call__(self, call: Call) -> None:
        input_tokens = call.count_input()
        worst_tokens = input_tokens + call.max_output_tokens
        needs_usd = any(b.usd is not None for b in self.budgets)
        worst_usd = (
            self.pricing.cost(call.model, input_tokens, call.max_output_tokens, warn=False) if needs_usd else 0.0
        )
        try:
            for budget in self.budgets:
                call.reservations.append(budget.reserve(
                    worst_tokens, worst_usd, user=call.user, session=call.session, request_id=call.request_id
                ))
        except BaseException:
            # All or nothing: drop the holds already taken in the other budgets (one whose
            # store fails now expires with its TTL, or is reaped with this process).
            for reservation in call.reservations:
                try:
                    reservation.release()
                except Exception:  # the refusal is what the caller must see
                    logger.warning("call %s: a budget hold could not be released", call.request_id, exc_info=True)
            call.reservations.clear()
            raise
