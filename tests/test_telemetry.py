"""Telemetry: every metered call as an OpenTelemetry span and GenAI metric points,
checked with the real OpenTelemetry SDK's in-memory span exporter and metric reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the test extra installs opentelemetry-sdk")

from backends.openai_server import PROMPT_TOKENS, OpenAIServer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import tokenguard as tg
from tokenguard import telemetry
from tokenguard.cache import ExactCache
from tokenguard.telemetry import OTelMeter, provider_name, telemetry_observer

MODEL = "gpt-4o-mini"


class Otel:
    """An OTelMeter on its own SDK providers, and what they recorded."""

    def __init__(self) -> None:
        self.spans_out = InMemorySpanExporter()
        self.tracer_provider = tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_out))
        self.reader = InMemoryMetricReader()
        self.meter = OTelMeter(tracer_provider=tracer_provider,
                               meter_provider=MeterProvider(metric_readers=[self.reader]))

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_out.get_finished_spans())

    def metrics(self) -> dict[str, object]:
        data = self.reader.get_metrics_data()
        found: dict[str, object] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                assert scope.scope.name == "tokenguard"
                for metric in scope.metrics:
                    found[metric.name] = metric
        return found

    def points(self, name: str) -> list:
        metric = self.metrics().get(name)
        return [] if metric is None else list(metric.data.data_points)  # type: ignore[attr-defined]


@pytest.fixture
def otel() -> Otel:
    return Otel()


def answer(messages, max_tokens, temperature=None):
    return "Paris is the capital of France."


def test_a_call_is_one_span_with_the_genai_attributes(otel):
    guard = tg.Guard(answer, model=MODEL, telemetry=otel.meter, max_output_tokens=64)
    reply = guard.complete("What is the capital of France?", session="conv-1", temperature=0.2)

    [span] = otel.spans()
    assert span.name == f"chat {MODEL}"
    assert span.kind is SpanKind.CLIENT  # a function usually calls a remote API
    assert span.status.status_code is StatusCode.UNSET
    attributes = dict(span.attributes or {})
    usage = reply.usage
    assert usage.input_tokens == tg.count_tokens([{"role": "user", "content": "What is the capital of France?"}],
                                                 model=MODEL)
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.conversation.id": "conv-1",
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": 0,
        "gen_ai.response.finish_reasons": ("stop",),
        "tokenguard.stop_reason": "stop",
        "tokenguard.cache_hit": False,
        "tokenguard.saved_tokens": 0,
        "tokenguard.context_saved_tokens": 0,
        "tokenguard.scope_saved_tokens": 0,
        "tokenguard.saved_usd": 0.0,
        "tokenguard.cost_usd": usage.cost_usd,
        "tokenguard.depth": 0,
        "tokenguard.request_id": reply.request_id,
        "tokenguard.root_id": reply.request_id,
        "tokenguard.backend": "function",
    }
    assert usage.output_tokens == tg.count_tokens("Paris is the capital of France.", model=MODEL)
    assert usage.cost_usd is not None and usage.cost_usd > 0
    [row] = guard.ledger.records()
    assert span.start_time == int(row["ts"] * 1e9)
    assert span.end_time is not None and span.end_time >= span.start_time


def test_token_usage_histogram_has_an_input_and_an_output_point(otel):
    guard = tg.Guard(answer, model=MODEL, telemetry=otel.meter)
    reply = guard.complete("What is the capital of France?")
    guard.complete("And of Italy?")

    metric = otel.metrics()["gen_ai.client.token.usage"]
    assert metric.unit == "{token}"  # type: ignore[attr-defined]
    points: list[HistogramDataPoint] = list(metric.data.data_points)  # type: ignore[attr-defined]
    by_type = {p.attributes["gen_ai.token.type"]: p for p in points}
    assert set(by_type) == {"input", "output"}
    input_point, output_point = by_type["input"], by_type["output"]
    assert input_point.count == output_point.count == 2
    rows = guard.ledger.records()
    assert input_point.sum == sum(r["input_tokens"] for r in rows)
    assert output_point.sum == sum(r["output_tokens"] for r in rows)
    assert reply.usage.input_tokens in (input_point.min, input_point.max)
    assert dict(input_point.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL, "gen_ai.token.type": "input",
    }
    assert list(input_point.explicit_bounds)[:4] == [1, 4, 16, 64]  # the conventions' advisory buckets
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 2 and duration.sum > 0


def test_a_cache_hit_span_shows_what_it_saved_and_records_no_tokens(otel, tmp_path):
    guard = tg.Guard(answer, model=MODEL, telemetry=otel.meter, cache=ExactCache(tmp_path / "answers"))
    first = guard.complete("Capital of France?", temperature=0)
    hit = guard.complete("Capital of France?", temperature=0)
    assert hit.cached

    miss_span, hit_span = otel.spans()
    attributes = dict(hit_span.attributes or {})
    assert attributes["tokenguard.cache_hit"] is True
    assert attributes["tokenguard.stop_reason"] == "cache"
    assert attributes["tokenguard.saved_tokens"] == first.usage.total_tokens == hit.usage.saved_tokens
    assert attributes["tokenguard.saved_usd"] == pytest.approx(first.usage.cost_usd)
    assert attributes["gen_ai.usage.input_tokens"] == attributes["gen_ai.usage.output_tokens"] == 0
    assert "gen_ai.response.finish_reasons" not in attributes  # the model did not answer
    assert dict(miss_span.attributes or {})["tokenguard.cache_hit"] is False
    # The hit used no tokens: the histogram still holds only the first call.
    assert {p.attributes["gen_ai.token.type"]: p.count for p in otel.points("gen_ai.client.token.usage")} == {
        "input": 1, "output": 1}
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 1
    [saved] = otel.points("tokenguard.client.tokens.saved")
    assert saved.value == first.usage.total_tokens
    assert saved.attributes["tokenguard.mechanism"] == "cache"


def test_cached_input_tokens_use_the_conventions_cache_read_name(otel):
    def completion(messages, max_tokens):
        return {"object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1200, "completion_tokens": 1,
                          "prompt_tokens_details": {"cached_tokens": 1024}}}

    tg.Guard(completion, model=MODEL, telemetry=otel.meter).complete("hello")
    attributes = dict(otel.spans()[0].attributes or {})
    assert attributes["gen_ai.usage.input_tokens"] == 1200  # cached ones included, as the conventions say
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 1024


def test_a_refused_call_is_an_error_span_without_metric_points(otel):
    guard = tg.Guard(answer, model=MODEL, telemetry=otel.meter, budget=tg.Budget(tokens=10), max_output_tokens=64)
    with pytest.raises(tg.BudgetExceeded):
        guard.complete("What is the capital of France?")
    [span] = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "BudgetExceeded"
    assert attributes["tokenguard.stop_reason"] == "budget_exceeded"
    assert "gen_ai.response.finish_reasons" not in attributes
    assert otel.points("gen_ai.client.token.usage") == []
    assert otel.points("gen_ai.client.operation.duration") == []


def test_a_failed_backend_call_records_its_error_type_on_the_duration(otel):
    def broken(messages, max_tokens):
        raise ConnectionError("the provider hung up")

    with pytest.raises(ConnectionError):
        tg.Guard(broken, model=MODEL, telemetry=otel.meter).complete("hello")
    [span] = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "ConnectionError"
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "ConnectionError"


def test_nested_calls_carry_their_depth_and_tree(otel):
    ledger = tg.Ledger()

    @tg.guard(model="gpt-4o", ledger=ledger, telemetry=otel.meter)
    def research(messages, max_tokens):
        return "billing: Priya"

    @tg.guard(model="gpt-4o", ledger=ledger, telemetry=otel.meter)
    def plan(messages, max_tokens):
        return research([*messages, {"role": "user", "content": "Who owns billing?"}])

    plan("Plan the week.", session="s")
    parent, child = sorted((dict(span.attributes or {}) for span in otel.spans()),
                           key=lambda attributes: attributes["tokenguard.depth"])
    assert (child["tokenguard.depth"], parent["tokenguard.depth"]) == (1, 0)
    assert child["tokenguard.parent_id"] == parent["tokenguard.request_id"]
    assert child["tokenguard.root_id"] == parent["tokenguard.root_id"] == parent["tokenguard.request_id"]
    assert "tokenguard.parent_id" not in parent
    assert [row["depth"] for row in ledger.records()] == [1, 0]


def _by_depth(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return sorted(spans, key=lambda span: (span.attributes or {})["tokenguard.depth"])


def test_a_nested_call_span_is_a_child_of_its_parent_calls_span(otel):
    tracer = otel.meter.tracer

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    def lookup(messages, max_tokens):
        return "Priya"

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    def research(messages, max_tokens):
        return lookup([*messages, {"role": "user", "content": "Who?"}])

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    def plan(messages, max_tokens):
        return research([*messages, {"role": "user", "content": "Who owns billing?"}])

    with tracer.start_as_current_span("request") as request:
        plan("Plan the week.")
    root, middle, leaf = _by_depth([span for span in otel.spans() if span.name != "request"])
    assert root.parent is not None and root.parent.span_id == request.get_span_context().span_id
    assert middle.parent is not None and middle.parent.span_id == root.context.span_id
    assert leaf.parent is not None and leaf.parent.span_id == middle.context.span_id
    assert {span.context.trace_id for span in (root, middle, leaf)} == {request.get_span_context().trace_id}
    assert leaf.start_time >= middle.start_time >= root.start_time  # the calls' own times, not the writing's
    assert leaf.end_time <= middle.end_time <= root.end_time


def test_guards_with_meters_of_their_own_still_nest_their_spans(otel):
    child_meter = OTelMeter(tracer_provider=otel.tracer_provider)

    @tg.guard(model="gpt-4o", telemetry=child_meter)
    def lookup(messages, max_tokens):
        return "Priya"

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    def research(messages, max_tokens):
        return lookup([*messages, {"role": "user", "content": "Who?"}])

    with otel.meter.tracer.start_as_current_span("request"):
        research("Who owns billing?")
    parent, child = _by_depth([span for span in otel.spans() if span.name != "request"])
    assert child.parent is not None and child.parent.span_id == parent.context.span_id


def test_a_child_of_a_guard_on_unconfigured_global_providers_is_still_written(otel):
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global tracer provider is configured in this process")

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    def lookup(messages, max_tokens):
        return "Priya"

    @tg.guard(model="gpt-4o")  # telemetry="auto": the global providers, which record nothing yet
    def research(messages, max_tokens):
        return lookup([*messages, {"role": "user", "content": "Who?"}])

    research("Who owns billing?")
    [span] = otel.spans()  # the child's: it must not wait for a parent span that never comes
    assert dict(span.attributes or {})["tokenguard.depth"] == 1


def test_a_nested_call_whose_parent_this_meter_never_records_is_written_at_once(otel):
    # The parent guard sends no telemetry here: waiting for its span would hold the child's for good.
    child = tg.Guard(answer, model=MODEL, telemetry=otel.meter)

    @tg.guard(model=MODEL, telemetry=False)
    def parent(messages, max_tokens):
        return child.complete("Which city?").text

    with otel.meter.tracer.start_as_current_span("request") as request:
        parent("Plan the trip.")
    [span] = [span for span in otel.spans() if span.name != "request"]
    assert dict(span.attributes or {})["tokenguard.depth"] == 1
    assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id


def test_a_child_metered_after_its_parent_is_still_its_child(otel):
    import asyncio

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    async def child(messages, max_tokens):
        await asyncio.sleep(0.05)
        return "late"

    tasks = []

    @tg.guard(model="gpt-4o", telemetry=otel.meter)
    async def parent(messages, max_tokens):
        tasks.append(asyncio.create_task(child("made inside the parent")))  # a child of this call
        return "early"

    async def main():
        await parent("start")
        await tasks[0]  # finishes after the parent was metered

    asyncio.run(main())
    first, second = _by_depth(otel.spans())
    assert second.parent is not None and second.parent.span_id == first.context.span_id


def test_an_openai_compatible_server_is_named_on_the_span(otel):
    with OpenAIServer() as server:
        guard = tg.Guard(tg.backends.OpenAICompatible(server.base_url, model=MODEL), telemetry=otel.meter)
        reply = guard.complete("hello")
    attributes = dict(otel.spans()[0].attributes or {})
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.input_tokens == PROMPT_TOKENS
    assert attributes["tokenguard.backend"] == "openai"


def test_a_failing_exporter_never_fails_the_call(otel, caplog):
    class Broken(OTelMeter):
        def __call__(self, call, row, error=None):
            raise RuntimeError("collector down")

    guard = tg.Guard(answer, model=MODEL, telemetry=Broken())
    with caplog.at_level(logging.WARNING, logger="tokenguard.pipeline.meter"):
        assert guard.complete("hello").text == answer(None, 0)
    assert "a meter observer failed" in caplog.text
    assert len(guard.ledger.records()) == 1


def test_telemetry_off_has_no_observer(otel):
    guard = tg.Guard(answer, model=MODEL, telemetry=False)
    assert guard.telemetry is None and guard.meter.observers == []
    guard.complete("hello")
    assert otel.spans() == []


def test_the_settings(monkeypatch):
    meter = OTelMeter()
    assert telemetry_observer(meter) is meter
    assert telemetry_observer(None) is None and telemetry_observer(False) is None
    assert telemetry_observer("auto") is telemetry_observer(True) is telemetry._global_meter()  # one per process
    with pytest.raises(tg.ConfigError):
        telemetry_observer("yes")
    monkeypatch.setattr(telemetry, "available", lambda: False)
    assert telemetry_observer("auto") is None  # without opentelemetry-api: nothing, silently
    monkeypatch.setattr(telemetry, "_default", None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    with pytest.raises(tg.MissingDependency, match=r"tokenguard\[otel\]"):
        telemetry_observer(True)


def test_provider_names():
    assert provider_name("runner", "SmolLM2-135M-Instruct") == "tokenguard"
    assert provider_name("openai", "llama-3-8b") == "openai"  # the wire format's flavour
    assert provider_name("function", "claude-sonnet-4") == "anthropic"
    assert provider_name("function", "gemini-2.0-flash") == "gcp.gemini"
    assert provider_name("function", "openai/o3-mini") == "openai"
    assert provider_name("function", "my-local-model") == "function"


_GLOBAL_PROVIDERS = textwrap.dedent("""
    import json
    import tokenguard as tg
    guard = tg.Guard(lambda messages, max_tokens: "ok", model="gpt-4o-mini")  # default: telemetry="auto"
    silent = tg.Guard(lambda messages, max_tokens: "ok", model="gpt-4o-mini", telemetry=False)
    guard.complete("before any SDK is configured")  # the API alone records nothing

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans, reader, provider = InMemorySpanExporter(), InMemoryMetricReader(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)  # configured after the guards were built
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    guard.complete("after")
    silent.complete("never sent")
    points = [p.count for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == "gen_ai.client.token.usage" for p in m.data.data_points]
    print(json.dumps({"spans": [dict(s.attributes)["gen_ai.usage.input_tokens"] for s in spans.get_finished_spans()],
                      "points": points}))
""")


def test_auto_telemetry_sends_to_the_global_providers_once_an_sdk_is_configured():
    done = subprocess.run([sys.executable, "-c", _GLOBAL_PROVIDERS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # One span: the call made after the SDK was set up; none before it, none from telemetry=False.
    assert seen["spans"] == [tg.count_tokens([{"role": "user", "content": "after"}], model="gpt-4o-mini")]
    assert seen["points"] == [1, 1]


def test_a_fitted_call_reports_the_prompt_tokens_fitting_spared(otel):
    guard = tg.Guard(answer, model=MODEL, telemetry=otel.meter, max_context_tokens=60)
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i} of a long chat."}
               for i in range(41)]
    reply = guard.complete(history)
    assert reply.usage.context_saved_tokens > 0
    [span] = otel.spans()
    attributes = dict(span.attributes or {})
    assert attributes["tokenguard.context_saved_tokens"] == reply.usage.context_saved_tokens
    assert attributes["tokenguard.saved_tokens"] == reply.usage.saved_tokens
    [saved] = otel.points("tokenguard.client.tokens.saved")
    assert (saved.value, saved.attributes["tokenguard.mechanism"]) == (reply.usage.context_saved_tokens, "context")


def test_a_stream_read_under_another_span_stays_under_the_span_it_was_made_in(otel):
    # A streamed HTTP answer is read after its request's span has ended.
    tracer = otel.meter.tracer
    guard = tg.Guard(lambda messages, max_tokens: iter(["Paris ", "is the capital."]), model="gpt-4o",
                     telemetry=otel.meter)
    with tracer.start_as_current_span("request-A") as made_in:
        stream = guard.stream("Capital of France?")
        next(stream)
    with tracer.start_as_current_span("request-B"):
        stream.read()
    [call] = [span for span in otel.spans() if span.name.startswith("chat")]
    assert call.parent is not None and call.parent.span_id == made_in.get_span_context().span_id


def test_a_summary_the_context_step_asks_for_is_a_child_of_the_call_it_serves(otel):
    from tokenguard.context import Summary

    guard = tg.Guard(lambda messages, max_tokens: "A short summary.", model="gpt-4o", max_context_tokens=150,
                     context=Summary(keep_recent_tokens=20), telemetry=otel.meter)
    history = [{"role": "user", "content": f"Note {i}: the locker code for gym {i} is {1000 + i}."} for i in range(30)]
    guard.complete([*history, {"role": "user", "content": "Which code?"}])
    spans = otel.spans()
    [served] = [span for span in spans if span.attributes["tokenguard.depth"] == 0]
    summaries = [span for span in spans if span.attributes["tokenguard.depth"] == 1]
    assert summaries and all(span.parent.span_id == served.context.span_id for span in summaries)


def test_a_call_its_caller_stopped_is_no_error_however_it_was_stopped(otel):
    # Closed with aclose(), or its task cancelled: both are cancelled calls, neither failed.
    ledger = tg.Ledger()

    @tg.guard(model="gpt-4o", ledger=ledger, telemetry=otel.meter)
    async def words(messages, max_tokens):
        for i in range(100):
            yield f"w{i} "
            await asyncio.sleep(0.01)

    async def main():
        stream = words("closed")
        await anext(stream)
        await stream.aclose()

        async def read():
            async for _ in words("cancelled"):
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [row["stop_reason"] for row in ledger.records()] == ["cancelled", "cancelled"]
    [row] = ledger.report(by="stop_reason").rows
    assert row["calls"] == 2 and row["errors"] == 0
    for span in otel.spans():
        assert span.status.status_code is StatusCode.UNSET and "gen_ai.response.finish_reasons" not in span.attributes
