"""Step 8, settle: turn a call's budget holds into what it actually used."""

from __future__ import annotations

from tokenguard.accounting import Usage
from tokenguard.pipeline.call import Call

__all__ = ["Settle"]


class Settle:
    """Settle each of the call's holds to its actual tokens (input + output) and cost,
    or release them when the call spent nothing (refused, failed before any output,
    cancelled before the backend answered)."""

    def __call__(self, call: Call, usage: Usage) -> None:
        spent = usage.total_tokens > 0 or bool(usage.cost_usd)
        for reservation in call.reservations:
            if spent:
                reservation.settle(usage.total_tokens, usage.cost_usd)
            else:
                reservation.release()
