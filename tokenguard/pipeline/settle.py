"""Step 8, settle: turn a call's budget holds into what it actually used."""

from __future__ import annotations

from tokenguard.accounting import Usage
from tokenguard.accounting.budget import charge
from tokenguard.pipeline.call import Call

__all__ = ["Settle"]


class Settle:
    """Settle each of the call's holds to its actual tokens (input + output) and cost,
    or release them when the call spent nothing (refused, failed before any output,
    cancelled before the backend answered). What counts is :func:`~tokenguard.accounting.budget.charge`,
    the rule a budget store also settles a dead process's hold by, from the call's ledger row."""

    def __call__(self, call: Call, usage: Usage) -> None:
        """Every hold is settled (or released) even when another's store fails; the
        first failure is raised after."""
        spent = charge(usage.total_tokens, usage.cost_usd) is not None
        failures = []
        for reservation in call.reservations:
            try:
                if spent:
                    reservation.settle(usage.total_tokens, usage.cost_usd)
                else:
                    reservation.release()
            except Exception as error:  # noqa: BLE001 - raised below, once the others are settled
                failures.append(error)
        if failures:
            raise failures[0]
