"""Step 7, meter: price a call's usage and write its ledger row."""

from __future__ import annotations

import time

from tokenguard.call import Call
from tokenguard.ledger import Ledger
from tokenguard.pricing import Pricing
from tokenguard.usage import Usage

__all__ = ["Meter"]


class Meter:
    """Build the call's :class:`~tokenguard.Usage` and append one row to the ledger."""

    def __init__(self, ledger: Ledger, pricing: Pricing) -> None:
        self.ledger = ledger
        self.pricing = pricing

    def usage(
        self, call: Call, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> Usage:
        """Priced usage; latency runs from the call's start to now."""
        return Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            cost_usd=self.pricing.cost(call.model, input_tokens, output_tokens, cached_input_tokens),
            latency_s=time.perf_counter() - call.started,
        )

    def __call__(self, call: Call, usage: Usage, stop_reason: str, error: BaseException | None = None) -> None:
        self.ledger.write(
            {
                "request_id": call.request_id,
                "ts": call.ts,
                "user": call.user,
                "session": call.session,
                "model": call.model,
                "backend": call.backend.name,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "cost_usd": usage.cost_usd,
                "latency_s": usage.latency_s,
                "stop_reason": stop_reason,
                "tags": call.tags,
                "error": None if error is None else f"{type(error).__name__}: {error}"[:2000],
            }
        )
