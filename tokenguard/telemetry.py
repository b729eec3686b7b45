"""Usage as OpenTelemetry telemetry, in the GenAI semantic conventions.

Every metered call (the meter step, step 7) becomes one span and points on the
``gen_ai.client.token.usage`` and ``gen_ai.client.operation.duration`` histograms,
named and shaped as the OpenTelemetry GenAI semantic conventions say, so any
OpenTelemetry backend shows tokenguard's calls beside those of other instrumented
clients. What the conventions have no name for is under ``tokenguard.``.

It needs only ``opentelemetry-api`` (``pip install 'tokenguard[otel]'``), which records
nothing until the application configures an SDK with an exporter: tokenguard never
configures one, so nothing is sent anywhere unless you do. ``Guard(telemetry="auto")``,
the default, turns it on when ``opentelemetry-api`` is importable; ``telemetry=False``
turns it off; ``telemetry=True`` requires it; an :class:`OTelMeter` built with your
own ``tracer_provider`` / ``meter_provider`` sends to those instead of the global ones.

The span of a call (name ``chat {model}``; kind ``INTERNAL`` for a model run in this
process, else ``CLIENT``) is written when the call is metered, with the call's real
start and end times, as a child of the span current at that point (your request's).
A nested call's span is the child of its parent call's: a nested call is metered
before its parent, so its span waits for the parent's and is written right after it
(a parent that is never metered releases its children's spans, unparented, once
:data:`MAX_WAITING` wait). Its attributes:

========================================= ======================================================
``gen_ai.operation.name``                 ``"chat"``
``gen_ai.provider.name``                  ``openai`` for an OpenAI-compatible server,
                                          ``tokenguard`` for the bundled runner, else the
                                          provider a model name belongs to, or the backend kind
``gen_ai.request.model``,                 the guard's model
``gen_ai.response.model``
``gen_ai.request.max_tokens``,            the call's output cap and its sampling parameters,
``.temperature``, ``.top_p``, ...       where given
``gen_ai.conversation.id``                the call's ``session``
``gen_ai.usage.input_tokens``             exact prompt tokens, cached ones included
``gen_ai.usage.output_tokens``            exact output tokens
``gen_ai.usage.cache_read.input_tokens``  prompt tokens the backend served from its own
                                          cache (the bundled runner's session KV reuse)
``gen_ai.response.finish_reasons``        ``[stop_reason]`` of a call the model answered
``error.type``                            the exception's class name, on a call that failed
                                          or was refused (span status ``ERROR``)
``server.address``, ``server.port``       an OpenAI-compatible backend's server
``tokenguard.stop_reason``                ``stop``, ``length``, ``repetition``, ``cache``,
                                          ``budget_exceeded``, ``input_too_long``, ...
``tokenguard.cache_hit``                  answered from a tokenguard cache (0 tokens billed)
``tokenguard.saved_tokens``,              what the guard spared: a cache hit's original cost,
``tokenguard.saved_usd``                  a stopped loop's rest of ``max_output_tokens``, the
                                          prompt tokens fitting and scope trimming left out
``tokenguard.context_saved_tokens``,      the part of ``saved_tokens`` that context fitting
``tokenguard.scope_saved_tokens``         and scope trimming spared
``tokenguard.cost_usd``                   the call's price (absent when unknown)
``tokenguard.depth``, ``.request_id``,    where the call sits in its call tree
``.parent_id``, ``.root_id``, ``.scope``
``tokenguard.backend``                    the backend kind (``runner``, ``openai``, ...)
========================================= ======================================================

Token points are recorded for calls that used tokens (not for cache hits or
refusals, which the spans still show), one per ``gen_ai.token.type`` (``input``,
``output``); the duration histogram records every call the backend was asked to
answer, with ``error.type`` when it failed. ``tokenguard.client.tokens.saved`` counts
the tokens spared, by ``tokenguard.mechanism`` (``cache``, ``context``, ``repetition``,
``scope``, ...). Message contents are never
recorded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tokenguard.accounting.report import savings_parts
from tokenguard.errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from tokenguard.pipeline.call import Call

__all__ = ["INSTALL_OTEL", "OTelMeter", "available", "provider_name", "telemetry_observer"]

INSTALL_OTEL = "pip install 'tokenguard[otel]'"

# The conventions' advisory bucket boundaries.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# Stop reasons of a call refused before the backend ran: no GenAI operation happened.
_REFUSED = frozenset({"budget_exceeded", "input_too_long"})
# Backends whose model runs in this process: their spans are INTERNAL, not CLIENT.
_IN_PROCESS = frozenset({"runner", "transformers"})
_PROVIDER_OF_BACKEND = {"openai": "openai", "runner": "tokenguard"}
# A model name's provider, for a function backend (the provider SHOULD be the
# instrumentation's best knowledge): first matching prefix wins.
_PROVIDER_OF_MODEL = (
    (("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-", "davinci", "babbage"), "openai"),
    (("claude",), "anthropic"),
    (("gemini",), "gcp.gemini"),
    (("mistral", "mixtral", "codestral", "ministral", "pixtral"), "mistral_ai"),
    (("deepseek",), "deepseek"),
    (("grok",), "x_ai"),
    (("command",), "cohere"),
    (("sonar",), "perplexity"),
)
_SAMPLING = (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
             ("top_k", "gen_ai.request.top_k"), ("seed", "gen_ai.request.seed"))


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        return False


def _version() -> str:
    try:
        return importlib.metadata.version("tokenguard")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provider_name(backend: str, model: str) -> str:
    """``gen_ai.provider.name`` for a call to ``model`` through a backend of kind ``backend``."""
    known = _PROVIDER_OF_BACKEND.get(backend)
    if known is not None:
        return known
    lowered = model.lower().rpartition("/")[2]
    for prefixes, provider in _PROVIDER_OF_MODEL:
        if lowered.startswith(prefixes):
            return provider
    return backend


class _CallSpans:
    """Where the spans of guarded calls stand, shared by every :class:`OTelMeter` in the
    process (guards nested in each other may each have their own meter): the spans of
    nested calls waiting for their parent call's span, by its request id; the span
    contexts of the calls metered last (for a child metered late); and the calls that
    have started under some meter and are not metered yet (only for those is a child's
    span worth waiting: a call no meter records never comes), with the OpenTelemetry
    context each started in (its span's parent when no guarded call is: a stream may be
    read, and end, under another span, or in another task)."""

    def __init__(self) -> None:
        self.waiting: OrderedDict[str, list[Callable[[Any], None]]] = OrderedDict()
        self.num_waiting = 0
        self.written: OrderedDict[str, Any] = OrderedDict()
        self.running: dict[str, Any] = {}
        self.lock = threading.Lock()


_CALL_SPANS = _CallSpans()


class OTelMeter:
    """Send each metered call to OpenTelemetry: one span, token and duration points.

    ``tracer_provider`` and ``meter_provider`` default to the global ones
    (``opentelemetry.trace.set_tracer_provider``, ``metrics.set_meter_provider``); as
    long as none is set, the API's proxies record nothing and cost a few microseconds a
    call, and once one is set, even after the guard was built, calls go to it. The
    guard calls it after writing each ledger row; an error inside it is logged, never
    raised into the call.
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None,
                 meter_provider: MeterProvider | None = None) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            raise MissingDependency("OpenTelemetry (opentelemetry-api)", INSTALL_OTEL) from None
        self._trace = trace
        self._metrics = metrics
        from opentelemetry import context as otel_context

        self._context = otel_context
        # On the global providers, which stay the API's no-op proxies until an SDK is
        # configured: while they are, a call is skipped after one check (see _idle).
        self._maybe_idle = tracer_provider is None and meter_provider is None
        version = _version()
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("tokenguard", version)
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("tokenguard", version)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._tree = _CALL_SPANS  # shared: a parent guard may have a meter of its own
        self.saved = meter.create_counter(
            "tokenguard.client.tokens.saved", unit="{token}",
            description="Tokens a tokenguard cache hit or stopped loop spared.",
        )

    def started(self, call: Call) -> None:
        """``call``, of a guard this meter serves, has started: the spans of calls nested
        in it (metered before it) wait for its span, unless this meter records nothing."""
        if self._maybe_idle and self._idle():
            return
        context = self._context.get_current()
        with self._tree.lock:
            self._tree.running[call.request_id] = context

    def __call__(self, call: Call, row: Mapping[str, Any], error: BaseException | None = None) -> None:
        """Record one call from its ledger ``row`` (:meth:`tokenguard.pipeline.Meter.__call__`)."""
        if self._maybe_idle and self._idle():
            with self._tree.lock:  # no span comes: whatever waits for one goes under the current span
                self._tree.running.pop(call.request_id, None)
                children = self._tree.waiting.pop(call.request_id, [])
                self._tree.num_waiting -= len(children)
            for child in children:
                child(None)
            return
        model = call.model
        backend = str(row["backend"])
        stop_reason = str(row["stop_reason"])
        common: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider_name(backend, model),
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
        }
        base_url = getattr(call.backend, "base_url", None)
        if isinstance(base_url, str):
            server = urlsplit(base_url)
            if server.hostname:
                common["server.address"] = server.hostname
                port = server.port or {"https": 443, "http": 80}.get(server.scheme)
                if port is not None:
                    common["server.port"] = port
        if stop_reason == "cancelled":  # the caller's choice, however it was made (close() or task.cancel())
            error = None
        error_type = type(error).__name__ if error is not None else None
        cached = bool(row["cached"])
        input_tokens, output_tokens = int(row["input_tokens"] or 0), int(row["output_tokens"] or 0)
        end_ns = time.time_ns()
        self._place_span(call, lambda parent: self._span(call, row, common, stop_reason, error, error_type,
                                                        cached, end_ns, parent))

        if not cached and stop_reason not in _REFUSED:
            duration_attrs = dict(common)
            if error_type is not None:
                duration_attrs["error.type"] = error_type
            self.duration.record(max(end_ns / 1e9 - call.ts, 0.0), duration_attrs)
        if not cached and input_tokens + output_tokens > 0:
            self.token_usage.record(input_tokens, {**common, "gen_ai.token.type": "input"})
            self.token_usage.record(output_tokens, {**common, "gen_ai.token.type": "output"})
        for mechanism, tokens, _ in savings_parts(row):
            self.saved.add(tokens, {**common, "tokenguard.mechanism": mechanism})

    def _idle(self) -> bool:
        """Whether the global providers are still the API's proxies (no SDK configured),
        so that whatever this meter records is dropped. Once one is configured it stays
        so, and this is not asked again. (A failed check only costs the skipped work.)"""
        if isinstance(self._trace.get_tracer_provider(), self._trace.ProxyTracerProvider) and (
            type(self._metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"
        ):
            return True
        self._maybe_idle = False
        return False

    def _place_span(self, call: Call, write: Callable[[Any], Any]) -> None:
        """Write a call's span (``write(parent context)`` returns it) under its parent
        call's span: now if that one is written (or the call has no parent), else once
        it is, when that call is one this meter will record (else under the current span).
        Then the spans that waited for this one, and theirs."""
        parent_id = call.parent_id
        released: list[Callable[[Any], None]] = []
        wait = False
        with self._tree.lock:
            started_in = self._tree.running.get(call.request_id)
            if parent_id is not None and parent_id not in self._tree.written and parent_id in self._tree.running:
                wait = True
                self._tree.waiting.setdefault(parent_id, []).append(lambda context: self._place(call, write, context))
                self._tree.num_waiting += 1
                while self._tree.num_waiting > MAX_WAITING:
                    oldest = self._tree.waiting.popitem(last=False)[1]
                    self._tree.num_waiting -= len(oldest)
                    released += oldest
            context = self._tree.written.get(parent_id) if parent_id is not None else None
            if context is None:  # no guarded call above it: the span its caller was in as it started
                context = started_in
        for orphan in released:  # their parent was never metered: under the current span
            orphan(None)
        if not wait:
            self._place(call, write, context)

    def _place(self, call: Call, write: Callable[[Any], Any], parent: Any) -> None:
        span = write(parent)
        context = self._trace.set_span_in_context(span)
        with self._tree.lock:
            self._tree.written[call.request_id] = context
            self._tree.running.pop(call.request_id, None)
            while len(self._tree.written) > MAX_WAITING:
                self._tree.written.popitem(last=False)
            children = self._tree.waiting.pop(call.request_id, [])
            self._tree.num_waiting -= len(children)
        for child in children:
            child(context)

    def _span(self, call: Call, row: Mapping[str, Any], common: dict[str, Any], stop_reason: str,
              error: BaseException | None, error_type: str | None, cached: bool, end_ns: int,
              parent: Any) -> Any:
        """Write the call's span (under ``parent``, an OpenTelemetry context, else the
        current one) and return it."""
        trace = self._trace
        kind = trace.SpanKind.INTERNAL if row["backend"] in _IN_PROCESS else trace.SpanKind.CLIENT
        span = self.tracer.start_span(f"chat {call.model}", context=parent, kind=kind,
                                      start_time=int(call.ts * 1e9))
        if not span.is_recording():  # no SDK configured: the API's no-op span
            span.end(end_time=end_ns)
            return span
        attributes: dict[str, Any] = {
            **common,
            "gen_ai.request.max_tokens": call.max_output_tokens,
            "gen_ai.usage.input_tokens": int(row["input_tokens"] or 0),
            "gen_ai.usage.output_tokens": int(row["output_tokens"] or 0),
            "gen_ai.usage.cache_read.input_tokens": int(row["cached_input_tokens"] or 0),
            "tokenguard.stop_reason": stop_reason,
            "tokenguard.cache_hit": cached,
            "tokenguard.saved_tokens": int(row["saved_tokens"] or 0),
            "tokenguard.context_saved_tokens": int(row["context_saved_tokens"] or 0),
            "tokenguard.scope_saved_tokens": int(row["scope_saved_tokens"] or 0),
            "tokenguard.depth": int(row["depth"] or 0),
            "tokenguard.request_id": call.request_id,
            "tokenguard.root_id": call.root_id,
            "tokenguard.backend": str(row["backend"]),
        }
        for param, name in _SAMPLING:
            value = call.params.get(param)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[name] = value
        optional = {
            "gen_ai.conversation.id": call.session,
            "tokenguard.parent_id": call.parent_id,
            "tokenguard.scope": call.scope_name,
            "tokenguard.cost_usd": row["cost_usd"],
            "tokenguard.saved_usd": row["saved_usd"],
        }
        attributes.update({name: value for name, value in optional.items() if value is not None})
        if error is None:
            if not cached and stop_reason != "cancelled":  # a hit is not the model's answer: it did not run
                attributes["gen_ai.response.finish_reasons"] = (stop_reason,)
        else:
            attributes["error.type"] = error_type
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:500]))
        span.set_attributes(attributes)
        span.end(end_time=end_ns)
        return span


#: Spans of nested calls held for a parent call that has not been metered yet, at most;
#: beyond that the oldest are written under the current span instead.
MAX_WAITING = 10_000

_default: OTelMeter | None = None
_default_lock = threading.Lock()


def _global_meter() -> OTelMeter:
    """One meter on the global providers for every guard that does not bring its own:
    instruments are created once per process."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = OTelMeter()
    return _default


def telemetry_observer(setting: object) -> OTelMeter | None:
    """What ``Guard(telemetry=setting)`` sends usage to: ``"auto"`` the global
    OpenTelemetry providers when ``opentelemetry-api`` is installed (else nothing),
    ``True`` the same or :class:`~tokenguard.MissingDependency`, ``False`` / ``None``
    nothing, an :class:`OTelMeter` itself."""
    if isinstance(setting, OTelMeter):
        return setting
    if setting is False or setting is None:
        return None
    if setting == "auto":
        return _global_meter() if available() else None
    if setting is True:
        return _global_meter()
    raise ConfigError(f'telemetry must be "auto", True, False or an OTelMeter, got {setting!r}')
