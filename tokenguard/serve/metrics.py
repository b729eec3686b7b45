"""The gateway's metrics, in the Prometheus text exposition format (``GET /metrics``).

Two sources feed it. Every call the guard meters (each ledger row: answered, failed,
cancelled, refused, served from the cache) reaches :meth:`Metrics.observe_call`, which
the app registers as one of the guard's meter observers, so the token, cost and
refusal counters add up to the ledger's own sums. The HTTP layer adds what only it
sees: requests by endpoint and status, their latency, time to the first streamed
piece, and refusals made before the guard runs (a bad key, a malformed body).

Labels are bounded on purpose: ``endpoint`` is one of the served routes (else
``other``), ``model`` the guard's model, ``stop_reason`` and ``reason`` small fixed
sets. No label names a user: ``/metrics`` is usually scraped without a key, and one
user's traffic is not another's business (the ledger has it per user).

Written by hand rather than with ``prometheus-client``: a dozen series, one lock, and
no global registry to share with the host application.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenguard.accounting.report import savings_parts

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics"]

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: a fast gateway answer (sub-millisecond) up to a long generation.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REFUSED = ("budget_exceeded", "input_too_long")

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Labels, values: Labels, extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass
class _Series:
    """One metric family: its help text, type, label names and values per label set."""

    name: str
    help: str
    kind: str  # counter, gauge
    label_names: Labels = ()
    values: dict[Labels, float] = field(default_factory=dict)

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for labels, value in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")


@dataclass
class Histogram:
    """A Prometheus histogram family: cumulative buckets, sum and count per label set."""

    name: str
    help: str
    label_names: Labels = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    _counts: dict[Labels, list[int]] = field(default_factory=dict)
    _sums: dict[Labels, float] = field(default_factory=dict)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self._counts.get(labels)
        if counts is None:
            counts = self._counts[labels] = [0] * (len(self.buckets) + 1)
            self._sums[labels] = 0.0
        counts[bisect.bisect_left(self.buckets, value)] += 1  # le: a value on a bound is in that bucket
        self._sums[labels] += value

    def count(self, labels: Labels) -> int:
        """How many values were observed with ``labels``."""
        return sum(self._counts.get(labels, ()))

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        for labels in sorted(self._counts):
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), self._counts[labels], strict=True):
                running += n
                le = 'le="+Inf"' if bound == float("inf") else f'le="{_number(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(self._sums[labels])}")
            out.append(f"{self.name}_count{_labels(self.label_names, labels)} {running}")


class Metrics:
    """Counters, gauges and histograms of one gateway, safe to feed from any thread
    (the guard meters calls in worker threads)."""

    def __init__(self, engine_stats: Callable[[], Mapping[str, int] | None] | None = None) -> None:
        self._lock = threading.Lock()
        self._engine_stats = engine_stats
        self.in_flight = 0
        s = _Series
        self.requests = s("tokenguard_http_requests_total", "HTTP requests answered, by endpoint and status code "
                          "(499: the client left before an answer).", "counter", ("endpoint", "status"))
        self.calls = s("tokenguard_calls_total", "Calls the guard metered (one ledger row each), by stop reason.",
                       "counter", ("model", "stop_reason"))
        self.input_tokens = s("tokenguard_input_tokens_total", "Prompt tokens billed (exact; cached ones included).",
                              "counter", ("model",))
        self.output_tokens = s("tokenguard_output_tokens_total", "Output tokens billed (exact).", "counter",
                               ("model",))
        self.cached_input_tokens = s("tokenguard_cached_input_tokens_total",
                                     "Prompt tokens the backend served from its own KV or prompt cache.", "counter",
                                     ("model",))
        self.cost = s("tokenguard_cost_usd_total", "Cost of the calls whose price is known, in US dollars.",
                      "counter", ("model",))
        self.unpriced = s("tokenguard_unpriced_calls_total",
                          "Calls that used tokens at an unknown price (not in tokenguard_cost_usd_total).", "counter",
                          ("model",))
        self.saved_tokens = s("tokenguard_saved_tokens_total",
                              "Tokens the guard spared, by mechanism: cache hits' original cost, stopped loops' unused "
                              "output cap, prompt tokens context fitting and scope trimming kept from being sent.",
                              "counter", ("model", "mechanism"))
        self.saved_usd = s("tokenguard_saved_usd_total", "The price of the tokens spared, where known.", "counter",
                           ("model", "mechanism"))
        self.cache_hits = s("tokenguard_cache_hits_total", "Calls answered from the tokenguard cache.", "counter",
                            ("model",))
        self.refusals = s("tokenguard_refusals_total",
                          "Requests refused: budget_exceeded, input_too_long (metered by the guard), unauthorized, "
                          "invalid_request, model_not_found, body_too_large (refused before the guard ran).",
                          "counter", ("reason",))
        self.call_latency = Histogram("tokenguard_call_duration_seconds",
                                      "Duration of metered calls that reached the backend or the cache.", ("model",))
        self.request_latency = Histogram("tokenguard_http_request_duration_seconds",
                                         "From the request's arrival to its answer's last byte.", ("endpoint",))
        self.first_piece = Histogram("tokenguard_time_to_first_token_seconds",
                                     "Streamed answers: from the request's arrival to its first text piece.",
                                     ("model",))

    # -- feeding -------------------------------------------------------------------------

    def observe_call(self, call: object, row: Mapping[str, Any], error: BaseException | None) -> None:
        """A guard meter observer: count one ledger row."""
        model = str(row.get("model") or "")
        reason = str(row.get("stop_reason") or "")
        key = (model,)
        with self._lock:
            self.calls.add((model, reason))
            self.input_tokens.add(key, row.get("input_tokens") or 0)
            self.output_tokens.add(key, row.get("output_tokens") or 0)
            self.cached_input_tokens.add(key, row.get("cached_input_tokens") or 0)
            cost = row.get("cost_usd")
            if cost is not None:
                self.cost.add(key, cost)
            elif row.get("input_tokens") or row.get("output_tokens"):
                self.unpriced.add(key)
            for mechanism, tokens, usd in savings_parts(row):
                self.saved_tokens.add((model, mechanism), tokens)
                self.saved_usd.add((model, mechanism), usd or 0.0)
            if row.get("cached"):
                self.cache_hits.add(key)
            if reason in _REFUSED:
                self.refusals.add((reason,))
            else:
                self.call_latency.observe(key, row.get("latency_s") or 0.0)

    def refused(self, reason: str) -> None:
        """Count a request refused before it reached the guard."""
        with self._lock:
            self.refusals.add((reason,))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests.add((endpoint, str(status)))
            self.request_latency.observe((endpoint,), seconds)

    def observe_first_piece(self, model: str, seconds: float) -> None:
        with self._lock:
            self.first_piece.observe((model,), seconds)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # -- exposition ----------------------------------------------------------------------

    def _engine(self) -> list[_Series]:
        """Gauges of the bundled runner's engine, when it serves and is loaded."""
        stats = self._engine_stats() if self._engine_stats is not None else None
        if not stats:
            return []
        gauges = [
            ("tokenguard_kv_blocks_free", "KV cache blocks free (not held by a running sequence or a live session).",
             "kv_blocks_free", "gauge"),
            ("tokenguard_kv_blocks_total", "KV cache blocks in the pool.", "kv_blocks_total", "gauge"),
            ("tokenguard_kv_block_size_tokens", "Tokens per KV cache block.", "kv_block_size", "gauge"),
            ("tokenguard_engine_running", "Sequences in the running batch.", "running", "gauge"),
            ("tokenguard_engine_waiting", "Sequences waiting for room in the batch.", "waiting", "gauge"),
            ("tokenguard_engine_sessions", "Chat sessions whose KV the engine keeps.", "sessions", "gauge"),
            ("tokenguard_engine_prefix_tokens_reused_total", "Prompt tokens not prefilled thanks to session reuse.",
             "prefix_tokens_reused", "counter"),
            ("tokenguard_engine_preemptions_total", "Sequences recomputed because KV blocks ran out.", "preemptions",
             "counter"),
        ]
        series = []
        for name, text, key, kind in gauges:
            if key in stats:
                one = _Series(name, text, kind)
                one.values[()] = float(stats[key])
                series.append(one)
        return series

    def render(self) -> str:
        """Every series in the text exposition format."""
        engine = self._engine()  # outside the lock: it takes the engine's own
        out: list[str] = []
        with self._lock:
            in_flight = _Series("tokenguard_http_requests_in_flight", "HTTP requests being answered now.", "gauge")
            in_flight.values[()] = float(self.in_flight)
            for series in (self.requests, in_flight, self.calls, self.input_tokens, self.output_tokens,
                           self.cached_input_tokens, self.cost, self.unpriced, self.saved_tokens, self.saved_usd,
                           self.cache_hits, self.refusals):
                series.render(out)
            for histogram in (self.request_latency, self.call_latency, self.first_piece):
                histogram.render(out)
        for series in engine:
            series.render(out)
        return "\n".join(out) + "\n"
