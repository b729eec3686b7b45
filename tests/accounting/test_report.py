"""Ledger.report: real SQLite ledgers written by a real Guard around plain-function
backends, real tokenizers, real prices and a real diskcache ExactCache."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from datetime import date, datetime, timezone

import numpy as np
import pytest

from tokenguard import Budget, Guard, InvalidRequest, Ledger, get_tokenizer
from tokenguard.accounting import REPORT_KEYS, Pricing, Report
from tokenguard.accounting.report import (
    METRICS,
    REFUSAL_REASONS,
    as_timestamp,
    format_usd,
    report_keys,
    tag_values,
)
from tokenguard.cache import ExactCache
from tokenguard.errors import BudgetExceeded, InputTooLong
from tokenguard.pipeline import generate

# Models without a price are part of what is tested; their one warning is not.
pytestmark = pytest.mark.filterwarnings("ignore::tokenguard.UnknownPriceWarning")

DAY1 = datetime(2025, 6, 1, 9, 30, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2025, 6, 2, 14, 5, tzinfo=timezone.utc).timestamp()
DAY3 = datetime(2025, 6, 3, 23, 59, tzinfo=timezone.utc).timestamp()
PREFIX = "Here is a haiku about budgets:\n\nNumbers in a row,\n"
LINE = "A budget is a canvas of choices,\n"


def answer(messages, *, max_tokens, **params):
    """A backend: a reply that depends on the question."""
    return f"An answer to: {messages[-1]['content']}"


def looping(messages, *, max_tokens):
    """A backend caught in a loop, which the repetition stopper ends."""
    yield PREFIX
    for _ in range(10_000):
        yield LINE


def failing(messages, *, max_tokens):
    raise RuntimeError("the backend is down")


def at(guard: Guard, ts: float, prompt: str, **request):
    """One call through the guard, as if made at ``ts`` (its ledger row's time)."""
    call = guard.prepare(prompt, **request)
    call.ts = ts
    return guard.open_stream(call).read()


def unpriced_guard(ledger: Ledger) -> Guard:
    """A guard on a model with no known price (counted with gpt-4o's tokenizer)."""
    return Guard(answer, model="house-llama", tokenizer="gpt-4o", ledger=ledger)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "usage.sqlite") as ledger:
        yield ledger


@pytest.fixture
def busy(ledger):
    """A ledger of three days: ann and bob on gpt-4o, carol on gpt-4o-mini, tags of every kind."""
    four_o = Guard(answer, model="gpt-4o", ledger=ledger)
    mini = Guard(answer, model="gpt-4o-mini", ledger=ledger)
    at(four_o, DAY1, "What is PagedAttention?", user="ann", session="a1", tags="docs")
    at(four_o, DAY1 + 60, "Explain KV caches in two lines.", user="ann", session="a1", tags=["docs", "kv"])
    at(four_o, DAY2, "Summarise this week.", user="bob", session="b1", tags={"team": "search", "v": 2})
    at(mini, DAY3, "Translate 人工智能.", user="carol", session="c1")
    at(mini, DAY3 + 1, "Count to three.", tags=[])
    return ledger


def sums(rows, name):
    return sum(row[name] for row in rows)


def test_report_by_user_sums_each_user_s_rows_exactly(busy):
    report = busy.report(by="user")
    assert report.by == ("user",) and report.columns == ["user", *METRICS]
    assert [row["user"] for row in report] == ["ann", "bob", "carol", None]  # sorted, no user last
    records = busy.records()
    for row in report:
        mine = [r for r in records if r["user"] == row["user"]]
        assert row["calls"] == len(mine)
        for name in ("input_tokens", "output_tokens", "cached_input_tokens", "saved_tokens"):
            assert row[name] == sums(mine, name)
        assert row["cost_usd"] == pytest.approx(sums(mine, "cost_usd")) and row["cost_usd"] > 0
        assert row["cost_note"] is None and row["errors"] == row["refusals"] == 0
    ann = report.rows[0]
    expected = sum(
        Pricing().cost(r["model"], r["input_tokens"], r["output_tokens"]) for r in records if r["user"] == "ann"
    )
    assert ann["cost_usd"] == pytest.approx(expected)
    totals = busy.totals()
    assert report.totals["calls"] == totals["calls"] == 5
    for name in ("input_tokens", "output_tokens", "cost_usd"):
        assert report.totals[name] == pytest.approx(totals[name])
    assert len(report) == 4 and list(report) == report.rows


def test_report_by_model_and_combinations(busy):
    by_model = busy.report(by="model")
    assert [(r["model"], r["calls"]) for r in by_model] == [("gpt-4o", 3), ("gpt-4o-mini", 2)]
    combined = busy.report(by=["model", "user"])
    assert [(r["model"], r["user"], r["calls"]) for r in combined] == [
        ("gpt-4o", "ann", 2), ("gpt-4o", "bob", 1), ("gpt-4o-mini", "carol", 1), ("gpt-4o-mini", None, 1)]
    assert busy.report(by="model, user").rows == combined.rows  # a comma-separated string is the same
    assert busy.report(by=["model", "model,user"]).by == ("model", "user")  # each key once
    assert busy.report(by="backend").rows[0]["backend"] == "function"
    (everything,) = busy.report(by=()).rows  # no keys: one row, the totals
    assert everything == busy.report(by="user").totals


def test_report_by_day_and_hour_in_utc(busy):
    by_day = busy.report(by="day")
    assert [(r["day"], r["calls"]) for r in by_day] == [("2025-06-01", 2), ("2025-06-02", 1), ("2025-06-03", 2)]
    by_hour = busy.report(by=["day", "hour"])
    assert [r["hour"] for r in by_hour] == ["2025-06-01 09:00", "2025-06-02 14:00", "2025-06-03 23:00"]
    assert [(r["user"], r["day"]) for r in busy.report(by="user,day")][:2] == [
        ("ann", "2025-06-01"), ("bob", "2025-06-02")]
    # The timeline spans three days: per day, with the known cost drawn by the chart.
    report = busy.report(by="user")
    assert report.timeline_unit == "day"
    assert [(t["period"], t["calls"]) for t in report.timeline] == [(r["day"], r["calls"]) for r in by_day]
    assert all(t["known_cost_usd"] == pytest.approx(t["cost_usd"]) for t in report.timeline)
    # Quiet periods are in the timeline as zeros, so that its axis is time.
    gappy = busy.report(by="user", until="2025-06-02").timeline  # two calls a minute apart: per hour
    assert [(t["period"], t["calls"]) for t in gappy] == [("2025-06-01 09:00", 2)]
    spread = Report.from_records([{"ts": DAY1, "cost_usd": 1.0}, {"ts": DAY3 + 86_400 * 2, "cost_usd": 2.0}])
    assert [(t["period"], t["calls"], t["cost_usd"]) for t in spread.timeline] == [
        ("2025-06-01", 1, 1.0), ("2025-06-02", 0, 0.0), ("2025-06-03", 0, 0.0), ("2025-06-04", 0, 0.0),
        ("2025-06-05", 1, 2.0)]


def test_since_and_until_bound_the_calls_half_open(busy):
    assert busy.report(by="day", since="2025-06-02").totals["calls"] == 3
    assert busy.report(by="day", until="2025-06-02").totals["calls"] == 2  # until is exclusive
    between = busy.report(by="day", since=date(2025, 6, 2), until=datetime(2025, 6, 3))
    assert [r["day"] for r in between] == ["2025-06-02"]
    assert (between.since, between.until) == (as_timestamp("2025-06-02"), as_timestamp("2025-06-03"))
    assert busy.report(by="day", since=DAY2, until=DAY2 + 1).totals["calls"] == 1  # epoch seconds
    assert busy.report(by="day", since="2025-06-02T16:05+02:00", until=str(DAY2 + 1)).totals["calls"] == 1
    assert busy.report(by="user", user="ann").totals["calls"] == 2  # column filters, as records() takes
    empty = busy.report(by="user", since="2030-01-01")
    assert empty.rows == [] and empty.totals["calls"] == 0 and empty.totals["cost_usd"] == 0.0
    assert "(no calls)" in empty.to_text()
    with pytest.raises(InvalidRequest, match="cannot read"):
        busy.report(by="day", since="June the first")


def test_an_unknown_price_is_unknown_never_zero(ledger):
    priced = Guard(answer, model="gpt-4o", ledger=ledger)
    unpriced = unpriced_guard(ledger)
    at(priced, DAY1, "hello", user="ann")
    at(unpriced, DAY1 + 1, "hello", user="ann")
    at(unpriced, DAY1 + 2, "hello again", user="bob")
    refusing = Guard(answer, model="house-llama", tokenizer="gpt-4o", ledger=ledger, max_input_tokens=3)
    with pytest.raises(InputTooLong):
        at(refusing, DAY1 + 3, "a question far longer than three tokens", user="dan")

    by_model = {row["model"]: row for row in ledger.report(by="model")}
    assert by_model["gpt-4o"]["cost_usd"] > 0 and by_model["gpt-4o"]["cost_note"] is None
    house = by_model["house-llama"]
    assert house["cost_usd"] is None  # never 0, though the refused call cost nothing
    assert house["cost_note"] == "cost unknown: 2 calls with no price (house-llama)"
    by_user = {row["user"]: row for row in ledger.report(by="user")}
    assert by_user["ann"]["cost_usd"] is None and "1 call with no price" in by_user["ann"]["cost_note"]
    assert by_user["dan"]["cost_usd"] == 0.0 and by_user["dan"]["refusals"] == 1  # spent nothing: known
    report = ledger.report(by="user")
    assert report.totals["cost_usd"] is None and "2 calls" in report.totals["cost_note"]
    assert ledger.totals()["cost_usd"] is None  # as in the report: a plain sum would hide the unknown part
    assert "Cost unknown: 2 calls with no price (house-llama)." in report.notes
    assert " unknown " in report.to_text().splitlines()[4]  # ann's row in the text table
    assert report.timeline[0]["cost_usd"] is None
    assert report.timeline[0]["known_cost_usd"] == pytest.approx(by_model["gpt-4o"]["cost_usd"])


def test_a_cache_hit_is_the_hit_rate_and_the_cache_s_savings(ledger, tmp_path):
    with ExactCache(tmp_path / "c") as cache:
        guard = Guard(answer, model="gpt-4o", ledger=ledger, cache=cache)
        first = guard.complete("What is the capital of France?", user="ann", temperature=0)
        again = guard.complete("What is the capital of France?", user="ann", temperature=0)
        guard.complete("And of Spain?", user="bob", temperature=0)
    assert again.cached and not first.cached
    by_user = {row["user"]: row for row in ledger.report(by="user")}
    assert by_user["ann"]["cache_hit_rate"] == 0.5 and by_user["bob"]["cache_hit_rate"] == 0.0
    assert by_user["ann"]["saved_tokens"] == first.usage.total_tokens
    assert by_user["ann"]["saved_usd"] == pytest.approx(first.usage.cost_usd)
    report = ledger.report(by="stop_reason")
    assert [(r["stop_reason"], r["calls"]) for r in report] == [("cache", 1), ("stop", 2)]
    assert report.totals["cache_hit_rate"] == pytest.approx(1 / 3)
    (cache_savings,) = report.savings
    assert cache_savings == {"mechanism": "cache", "calls": 1, "saved_tokens": first.usage.total_tokens,
                             "saved_usd": pytest.approx(first.usage.cost_usd)}


def test_stop_reasons_errors_refusals_and_repetition_savings(ledger):
    fine = Guard(answer, model="gpt-4o", ledger=ledger, max_output_tokens=3)
    fine.complete("Say something long.")  # cut at 3 tokens: "length"
    Guard(answer, model="gpt-4o", ledger=ledger).complete("Say something short.")
    loop = Guard(looping, model="gpt-4o", ledger=ledger, max_output_tokens=500)
    stopped = loop.complete("Write a haiku about budgets.")
    with pytest.raises(RuntimeError):
        Guard(failing, model="gpt-4o", ledger=ledger).complete("hello")
    with pytest.raises(InputTooLong):
        Guard(answer, model="gpt-4o", ledger=ledger, max_input_tokens=2).complete("far too long a question")
    with pytest.raises(BudgetExceeded):
        Guard(answer, model="gpt-4o", ledger=ledger, budget=Budget(tokens=5)).complete("hello")

    report = ledger.report(by="stop_reason")
    rows = {row["stop_reason"]: row for row in report}
    assert sorted(rows) == ["budget_exceeded", "error", "input_too_long", "length", "repetition", "stop"]
    assert rows["error"]["errors"] == 1 and rows["error"]["refusals"] == 0
    assert rows["input_too_long"]["refusals"] == rows["budget_exceeded"]["refusals"] == 1
    assert rows["input_too_long"]["errors"] == 0  # a refusal is the guard working, not a failure
    assert (report.totals["errors"], report.totals["refusals"]) == (1, 2)
    assert rows["repetition"]["saved_tokens"] == stopped.usage.saved_tokens > 0
    assert report.savings == [{"mechanism": "repetition", "calls": 1, "saved_tokens": stopped.usage.saved_tokens,
                               "saved_usd": pytest.approx(stopped.usage.saved_usd)}]


def _history(turns: int) -> list[dict[str, str]]:
    history = [{"role": "system", "content": "You answer questions about the ledger."}]
    for i in range(turns):
        history.append({"role": "user", "content": f"Question {i}: what did call {i} of the batch cost us?"})
        history.append({"role": "assistant", "content": f"Call {i} cost about {i * 3} cents in total."})
    return [*history, {"role": "user", "content": "And which call was the dearest?"}]


def test_context_fitting_savings_are_the_prompt_tokens_it_kept_from_being_sent(ledger):
    guard = Guard(answer, model="gpt-4o", ledger=ledger, max_context_tokens=120)
    history = _history(40)
    reply = guard.complete(history)
    whole = get_tokenizer("gpt-4o").count_messages(history)
    # OpenAI's accounting adds up message by message, so the figure is exact here.
    assert reply.usage.context_saved_tokens == whole - reply.usage.input_tokens > 1000
    assert reply.usage.saved_tokens == reply.usage.context_saved_tokens and reply.usage.scope_saved_tokens == 0
    assert reply.usage.saved_usd == pytest.approx(guard.pricing.cost("gpt-4o", reply.usage.context_saved_tokens, 0))
    guard.complete("A short question that fits.")  # nothing to trim, nothing saved
    with pytest.raises(BudgetExceeded):  # a refused call spent nothing, so saved nothing
        Guard(answer, model="gpt-4o", ledger=ledger, max_context_tokens=120, budget=Budget(tokens=5)).complete(history)

    (row, short, refused) = ledger.records()
    assert (row["context_saved_tokens"], row["saved_tokens"]) == (reply.usage.context_saved_tokens,) * 2
    assert row["context_saved_usd"] == pytest.approx(reply.usage.saved_usd)
    assert short["saved_tokens"] == refused["saved_tokens"] == refused["context_saved_tokens"] == 0
    assert ledger.report().savings == [{"mechanism": "context", "calls": 1, "saved_tokens": row["saved_tokens"],
                                        "saved_usd": pytest.approx(row["saved_usd"])}]


def test_scope_and_cache_savings_are_reported_each_under_its_own_mechanism(ledger, tmp_path):
    inner = Guard(answer, model="gpt-4o", ledger=ledger, cache=ExactCache(tmp_path / "cache"))

    def planner(messages, *, max_tokens):
        # A nested call forwards the whole conversation it was given, plus its own task.
        task = {"role": "user", "content": "Name the dearest call only."}
        return inner.complete([*messages, task], user="ann", temperature=0).text

    outer = Guard(planner, model="gpt-4o", ledger=ledger)
    history = _history(30)
    outer.complete(history, user="ann")
    outer.complete(history, user="ann")  # the nested call is a cache hit this time
    rows = ledger.records()
    nested = [row for row in rows if row["depth"] == 1]
    assert [row["cached"] for row in nested] == [0, 1]
    assert nested[0]["scope_saved_tokens"] == nested[1]["scope_saved_tokens"] > 500
    first_call_cost = nested[0]["input_tokens"] + nested[0]["output_tokens"]
    assert nested[1]["saved_tokens"] == nested[1]["scope_saved_tokens"] + first_call_cost
    savings = {entry["mechanism"]: entry for entry in ledger.report().savings}
    assert sorted(savings) == ["cache", "scope"]
    assert (savings["scope"]["calls"], savings["scope"]["saved_tokens"]) == (2, 2 * nested[0]["scope_saved_tokens"])
    assert (savings["cache"]["calls"], savings["cache"]["saved_tokens"]) == (1, first_call_cost)
    assert savings["cache"]["saved_usd"] == pytest.approx(nested[0]["cost_usd"])


def test_refusal_reasons_are_the_ones_the_pipeline_writes():
    assert set(generate._REFUSALS.values()) == REFUSAL_REASONS


def test_report_by_depth_of_nested_calls(ledger):
    inner = Guard(answer, model="gpt-4o", ledger=ledger)

    def outer_backend(messages, *, max_tokens):
        return "Done: " + inner.complete("a sub-task").text

    Guard(outer_backend, model="gpt-4o", ledger=ledger).complete("the whole task", user="ann")
    Guard(outer_backend, model="gpt-4o", ledger=ledger).complete("another task", user="ann")
    report = ledger.report(by="depth")
    assert [(row["depth"], row["calls"]) for row in report] == [(0, 2), (1, 2)]
    records = ledger.records()
    assert report.rows[1]["input_tokens"] == sum(r["input_tokens"] for r in records if r["depth"] == 1)


def test_report_by_tag_explodes_strings_lists_and_dicts(busy):
    report = busy.report(by="tag")
    assert [(row["tag"], row["calls"]) for row in report] == [
        ("docs", 2), ("kv", 1), ("team=search", 1), ("v=2", 1), (None, 2)]
    assert report.totals["calls"] == 5  # each call once, however many tags it has
    assert any("several tags" in note for note in report.notes)
    by_user_tag = busy.report(by=["user", "tag"])
    assert [(r["user"], r["tag"]) for r in by_user_tag][:3] == [("ann", "docs"), ("ann", "kv"), ("bob", "team=search")]


@pytest.mark.parametrize(("tags", "values"), [
    (None, []), ("", []), ([], []), ({}, []),
    ("docs", ["docs"]),
    (["a", "b", "a"], ["a", "b"]),
    ({"team": "search", "v": 2, "flag": True, "none": None}, ["team=search", "v=2", "flag=true", "none=null"]),
    ([1, {"k": "v"}], ["1", '{"k": "v"}']),
    (7, ["7"]),
])
def test_tag_values(tags, values):
    assert tag_values(tags) == values


def test_latency_percentiles_are_exact(ledger):
    guard = Guard(answer, model="gpt-4o", ledger=ledger)
    for i in range(7):
        guard.complete(f"question {i}", user="ann")
    (row,) = ledger.report(by="user").rows
    latencies = [r["latency_s"] for r in ledger.records()]
    assert row["latency_p50_s"] == pytest.approx(float(np.percentile(latencies, 50)))
    assert row["latency_p95_s"] == pytest.approx(float(np.percentile(latencies, 95)))
    one = Report.from_records([{"ts": 0.0, "latency_s": 0.25}], by=())
    assert one.rows[0]["latency_p50_s"] == one.rows[0]["latency_p95_s"] == 0.25


def test_bad_keys_and_times_are_refused():
    ledger = Ledger()  # the in-memory ledger reports too
    with pytest.raises(InvalidRequest, match=r"cannot report by 'team'.*user, session"):
        ledger.report(by="team")
    with pytest.raises(InvalidRequest):
        report_keys([3])  # type: ignore[list-item]
    for bad in (True, float("nan"), "2025-13-01", object()):
        with pytest.raises(InvalidRequest):
            as_timestamp(bad)  # type: ignore[arg-type]
    assert set(REPORT_KEYS) == {"user", "session", "model", "backend", "tag", "day", "hour", "depth", "stop_reason"}
    assert as_timestamp("2025-06-01T00:00:00Z") == as_timestamp("2025-06-01") == as_timestamp(date(2025, 6, 1))
    assert as_timestamp(datetime(2025, 6, 1)) == as_timestamp("2025-06-01")  # naive is UTC


def test_format_usd():
    assert [format_usd(v) for v in (None, 0.0, 5e-06, 0.003085, 12.5, 1234.5)] == [
        "unknown", "$0.00", "$0.00000500", "$0.00309", "$12.50", "$1,234.50"]


def test_csv_and_json_round_trip(busy, tmp_path):
    unpriced_guard(busy).complete("hi", user="ann")
    report = busy.report(by=["user", "day"])
    text = report.to_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text(encoding="utf-8") == text
    read = list(csv.DictReader(io.StringIO(text)))
    assert list(read[0]) == report.columns
    for row, back in zip(report.rows, read, strict=True):
        for name, value in row.items():
            assert back[name] == ("" if value is None else str(value)), name
    ann_today = read[1]
    assert ann_today["cost_usd"] == "" and "no price" in ann_today["cost_note"]  # unknown: empty, with a note

    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data == json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["rows"] == report.rows and data["totals"] == report.totals
    assert data["by"] == ["user", "day"] and data["columns"] == report.columns
    assert data["savings"] == report.savings and data["timeline"] == report.timeline
    assert data["totals"]["cost_usd"] is None and data["notes"] == report.notes


def test_text_and_jupyter_tables_need_no_extra(busy):
    report = busy.report(by="user")
    lines = report.to_text().splitlines()
    assert lines[0] == "tokenguard usage by user"
    assert lines[2].split()[:4] == ["user", "calls", "input", "output"]
    assert lines[4].split()[:2] == ["ann", "2"] and any(line.startswith("total ") for line in lines)
    assert str(report) == report.to_text()
    html = report._repr_html_()
    assert html.startswith("<div>") and "<table" in html and "<td class=\"key\">ann</td>" in html
    assert "<img" not in html
    assert "5 calls" in repr(report)


def test_dataframe(busy):
    pd = pytest.importorskip("pandas")
    unpriced_guard(busy).complete("hi", user="ann")
    report = busy.report(by=["user", "model"])
    frame = report.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == report.columns and len(frame) == len(report)
    assert frame["calls"].sum() == report.totals["calls"]
    unknown = frame[frame["model"] == "house-llama"]
    assert unknown["cost_usd"].isna().all() and unknown["cost_note"].str.contains("no price").all()
    assert frame.loc[frame["model"] == "gpt-4o", "cost_usd"].gt(0).all()
    assert frame.attrs["totals"] == report.totals


def test_plot_and_self_contained_html(busy, tmp_path):
    pytest.importorskip("matplotlib")
    unpriced_guard(busy).complete("hi", user="ann")
    Guard(looping, model="gpt-4o", ledger=busy, max_output_tokens=300).complete("haiku")
    report = busy.report(by="user")
    figure = report.plot()
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["spend per day (USD)", "tokens by user", "saved tokens by mechanism"]
    page = report.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == page
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "<td class=\"key\">ann</td>" in page and "unknown" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # no external assets


def test_ids_anyone_chooses_are_inert_in_csv_terminals_and_charts(ledger):
    # A gateway's client names its own user and tags: none may run in a spreadsheet,
    # move a terminal's cursor, or break the chart (a "$" starts matplotlib's math text).
    guard = Guard(answer, model="gpt-4o", ledger=ledger)
    hostile = ['=HYPERLINK("http://evil.example","click")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3",
               "mallory\x1b[2K\x1b[1A", "two\nlines", "$\\frac$"]
    for user in hostile:
        guard.complete("hi", user=user)
    report = ledger.report(by="user")
    users = [row["user"] for row in csv.DictReader(io.StringIO(report.to_csv()))]
    assert sorted(users) == sorted(f"'{u}" if u[0] in "=+-@" else u for u in hostile)
    text = report.to_text()
    assert "\x1b" not in text and "mallory\\x1b[2K" in text and "two\\nlines" in text
    pytest.importorskip("matplotlib")
    assert "mallory" in report.to_html()


def test_without_the_reports_extra_the_rendering_names_it(tmp_path):
    """pandas and matplotlib made unimportable in a fresh process: rows, CSV, JSON and
    tables still work; a DataFrame, a plot and an HTML file say what to install."""
    path = tmp_path / "usage.sqlite"
    Guard(answer, model="gpt-4o", ledger=Ledger(path)).complete("hello", user="ann")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["pandas"] = None
        sys.modules["matplotlib"] = None
        sys.modules["matplotlib.figure"] = None
        from tokenguard import Ledger, MissingDependency
        report = Ledger({str(path)!r}).report(by="user")
        assert report.rows[0]["user"] == "ann" and report.to_csv() and report.to_json() and report.to_text()
        assert "<table" in report._repr_html_()
        print(repr(report))
        for render in (report.to_dataframe, report.plot, report.to_html):
            try:
                render()
            except MissingDependency as error:
                print(error)
            else:
                raise AssertionError(render)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'pip install "tokenguard[reports]"' in lines[0]  # the repr says which extra renders
    assert lines[1:] == [
        'pandas (for Report.to_dataframe) is not installed; install it with: pip install "tokenguard[reports]"',
        'matplotlib (for Report.plot) is not installed; install it with: pip install "tokenguard[reports]"',
        'matplotlib (for Report.plot) is not installed; install it with: pip install "tokenguard[reports]"',
    ]
