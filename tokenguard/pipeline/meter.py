"""Step 7, meter: resolve a call's usage exactly, price it and write its ledger row."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenguard.accounting import Ledger, Pricing, Usage
from tokenguard.errors import StoreError
from tokenguard.pipeline.call import Call
from tokenguard.pipeline.generate import Outcome

__all__ = ["Meter", "MeterObserver"]

logger = logging.getLogger(__name__)

#: Told of every row the meter writes: ``observer(call, row, error)`` (telemetry,
#: :class:`tokenguard.telemetry.OTelMeter`).
MeterObserver = Callable[[Call, Mapping[str, Any], BaseException | None], None]


class Meter:
    """Build a call's :class:`~tokenguard.Usage` and append one row to the ledger;
    then tell each of ``observers`` (telemetry) of the row. An observer that fails is
    logged, never raised into the call."""

    def __init__(self, ledger: Ledger, pricing: Pricing, observers: Sequence[MeterObserver] = ()) -> None:
        self.ledger = ledger
        self.pricing = pricing
        self.observers = list(observers)

    def usage(self, call: Call, outcome: Outcome) -> Usage:
        """The call's usage: the backend's own counts where it reported them, else
        exact counts of the prompt and of the text the backend sent (to the output cap).
        A call that spent nothing costs nothing. A stream a watcher ended before the
        backend finished saved (an estimate) the rest of its ``max_output_tokens``.

        Never raises: when counting fails, the usage holds only the prompt (counted
        before the backend ran), its cost is unknown, and the failure becomes
        ``outcome.error``, so the call's row is still written.
        """
        if not outcome.spent:
            return self.priced(call, 0, 0, cost_usd=0.0)
        reported = outcome.backend_usage
        try:
            input_tokens = reported.input_tokens if reported is not None else None
            output_tokens = reported.output_tokens if reported is not None else None
            if output_tokens is None:
                # What the backend sent, to the output cap: a watcher may have kept less of it
                # (a loop's repeats), but it was generated; past the cap it is not the
                # guard's to bill (the backend was asked to stop there), nor worth counting.
                cap = call.max_output_tokens
                output_tokens = min(call.tokenizer.count_until(outcome.streamed, cap), cap)
            # Past the cap the guard asked for, a backend's own count is not the guard's to
            # bill either (a server that ignored max_tokens): the reader got the cap's worth.
            # A function that takes no max_tokens was never asked: what it reports stands.
            if getattr(call.backend, "takes_max_tokens", True):
                output_tokens = min(output_tokens, call.max_output_tokens)
            usage = self.priced(
                call,
                call.count_input() if input_tokens is None else input_tokens,
                output_tokens,
                (reported.cached_input_tokens or 0) if reported is not None else 0,
            )
        except Exception as count_error:  # noqa: BLE001 - the row must still be written
            outcome.error = outcome.error or count_error
            # What is known: the prompt (counted before the backend ran); the cost is not.
            return Usage(
                input_tokens=call.input_tokens or 0, latency_s=time.perf_counter() - call.started, depth=call.depth
            )
        if outcome.stopped_early:
            usage.saved_tokens = max(call.max_output_tokens - output_tokens, 0)
            usage.saved_usd = self.pricing.cost(call.model, 0, usage.saved_tokens)
        self.add_spared_input(call, usage)
        return usage

    def add_spared_input(self, call: Call, usage: Usage) -> None:
        """Add to ``usage``'s savings the prompt tokens that scope trimming and context
        fitting kept from being sent: for a call whose trimmed prompt reached the backend
        or a cache (a refused call spent nothing, so it saved nothing either)."""
        for tokens in (call.context_saved_tokens, call.scope_saved_tokens):
            if tokens:
                price = self._input_price(call, tokens)  # as the ledger row prices each part
                usage.saved_tokens += tokens
                usage.saved_usd = None if price is None or usage.saved_usd is None else usage.saved_usd + price
        usage.context_saved_tokens = call.context_saved_tokens
        usage.scope_saved_tokens = call.scope_saved_tokens

    def priced(
        self,
        call: Call,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        *,
        cost_usd: float | None = None,
    ) -> Usage:
        """Usage with its cost (``cost_usd`` given, else from the call's model price);
        latency runs from the call's start to now."""
        if cost_usd is None:
            cost_usd = self.pricing.cost(call.model, input_tokens, output_tokens, cached_input_tokens)
        return Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            cost_usd=cost_usd,
            latency_s=time.perf_counter() - call.started,
            depth=call.depth,
        )

    def _input_price(self, call: Call, tokens: int) -> float | None:
        """The price of ``tokens`` prompt tokens of the call's model (0 for none)."""
        return self.pricing.cost(call.model, tokens, 0) if tokens else 0.0

    def __call__(self, call: Call, usage: Usage, stop_reason: str, error: BaseException | None = None, *,
                 cached: bool = False) -> None:
        """Write the call's ledger row, linked into its call tree (``depth``,
        ``parent_id``, ``root_id``) whether or not the scope step trims; ``cached``
        marks an answer served from a cache."""
        row = {
            "request_id": call.request_id,
            "ts": call.ts,
            "user": call.user,
            "session": call.session,
            "model": call.model,
            "backend": call.backend.name,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "saved_tokens": usage.saved_tokens,
            "saved_usd": usage.saved_usd,
            "context_saved_tokens": usage.context_saved_tokens,
            "context_saved_usd": self._input_price(call, usage.context_saved_tokens),
            "scope_saved_tokens": usage.scope_saved_tokens,
            "scope_saved_usd": self._input_price(call, usage.scope_saved_tokens),
            "cached": cached,
            "cost_usd": usage.cost_usd,
            "latency_s": usage.latency_s,
            "stop_reason": stop_reason,
            "tags": call.tags,
            "error": None if error is None else f"{type(error).__name__}: {error}"[:2000],
            "depth": call.depth,
            "parent_id": call.parent_id,
            "root_id": call.root_id,
            "scope": call.scope_name,
        }
        try:
            self.ledger.write(row)
        except StoreError:
            # The call happened (perhaps it was paid for): its row, to be written again.
            logger.error("call %s: its ledger row could not be written: %s", call.request_id,
                         json.dumps(row, default=str, ensure_ascii=False))
            raise
        finally:
            for observer in self.observers:
                try:
                    observer(call, row, error)
                except Exception:  # telemetry never fails a call
                    logger.warning("a meter observer failed on call %s", call.request_id, exc_info=True)
