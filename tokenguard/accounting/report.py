"""Usage reports: the ledger's rows grouped by who, what and when, and summed.

``Ledger.report(by="user")`` returns a :class:`Report`: one row per group (calls,
input/output/cached tokens, cost, saved tokens and cost, cache hit rate, p50/p95
latency, errors, refusals) plus the totals, a spend timeline and the savings by
mechanism. The aggregation is plain Python, so rows, iteration, CSV, JSON, the text
table and the Jupyter table need nothing beyond the standard library; a DataFrame,
plots and the HTML file's chart need ``pip install "tokenguard[reports]"`` (pandas,
matplotlib), and say so when it is missing.

Group keys (``by``):

- ``user``, ``session``, ``model``, ``backend``, ``stop_reason``, ``depth``: the column.
- ``day`` (``"2025-06-01"``) and ``hour`` (``"2025-06-01 14:00"``): the call's start, in UTC.
- ``tag``: each tag of the call; a call with several tags counts in each of their
  groups (so the groups' sums can exceed the totals, which count every call once).
  The tags a call was given become keys thus: a string is one tag; a list gives one
  tag per distinct item; a dict gives one ``"key=value"`` tag per entry; any other
  value is one tag. Items and values that are not strings are written as JSON
  (``1``, ``true``, ``null``). A call without tags (or with ``""``, ``[]``, ``{}``) is in
  the ``None`` group.

Unknown prices are never 0: a group with a call that spent tokens on a model with no
known price has ``cost_usd`` ``None`` (NaN in a DataFrame, empty in CSV) and a
``cost_note`` saying how many calls had no price; ``saved_usd`` likewise.

>>> report = Report.from_records([
...     {"ts": 0.0, "user": "ann", "model": "m", "input_tokens": 3, "output_tokens": 2, "cost_usd": 0.5,
...      "latency_s": 0.2, "cached": 0, "saved_tokens": 0, "saved_usd": 0.0, "stop_reason": "stop"},
... ], by="user")
>>> report.rows[0]["user"], report.rows[0]["calls"], report.rows[0]["cost_usd"]
('ann', 1, 0.5)
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import importlib
import importlib.util
import io
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenguard.errors import InvalidRequest, MissingDependency

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "INPUT_MECHANISMS",
    "INSTALL_REPORTS",
    "METRICS",
    "REFUSAL_REASONS",
    "REPORT_KEYS",
    "Moment",
    "Report",
    "as_timestamp",
    "format_usd",
    "report_keys",
    "savings_parts",
    "tag_values",
]

#: What ``by`` accepts.
REPORT_KEYS = ("user", "session", "model", "backend", "tag", "day", "hour", "depth", "stop_reason")
#: The columns every row (and the totals) has after its group keys, in order.
METRICS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "saved_tokens",
    "saved_usd",
    "cache_hit_rate",
    "latency_p50_s",
    "latency_p95_s",
    "errors",
    "refusals",
    "cost_note",
)
#: Stop reasons the pipeline writes for a call it refused before the backend ran
#: (``pipeline.generate``): counted as refusals, not errors.
REFUSAL_REASONS = frozenset({"input_too_long", "budget_exceeded"})
#: The install command for DataFrames, plots and the HTML chart.
INSTALL_REPORTS = 'pip install "tokenguard[reports]"'
#: The savings mechanisms with a ledger column pair of their own (``{name}_saved_tokens``,
#: ``{name}_saved_usd``): prompt tokens that context fitting and scope trimming spared.
#: The rest of a row's saved tokens is its cache hit's or its early stop's.
INPUT_MECHANISMS = ("context", "scope")

Moment = float | int | str | datetime | date | None
"""A time bound: epoch seconds, an ISO date or date-time string, a ``datetime`` or a
``date`` (a naive one is UTC), or ``None`` for no bound."""

_TOP_KEYS_PLOTTED = 15  # groups drawn in the tokens chart, largest first
_FLOAT_COLUMNS = ("cost_usd", "saved_usd", "cache_hit_rate", "latency_p50_s", "latency_p95_s")


# -- inputs --------------------------------------------------------------------------------


def report_keys(by: str | Iterable[str]) -> tuple[str, ...]:
    """``by`` as a tuple of distinct :data:`REPORT_KEYS`: one key, a comma-separated
    string (``"user,model"``) or a list of either. Raises
    :class:`~tokenguard.InvalidRequest` naming the keys it accepts."""
    names = [by] if isinstance(by, str) else list(by)
    keys: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise InvalidRequest(f"report keys are strings, got {type(name).__name__}")
        for key in (part.strip() for part in name.split(",")):
            if key not in REPORT_KEYS:
                raise InvalidRequest(f"cannot report by {key!r}; use one or more of: {', '.join(REPORT_KEYS)}")
            if key not in keys:
                keys.append(key)
    return tuple(keys)


# The times a datetime can show (a report titles its bounds as dates).
_EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()
_LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc).timestamp()


def as_timestamp(moment: Moment) -> float | None:
    """Epoch seconds of a time bound (see :data:`Moment`); ``None`` stays ``None``.

    >>> as_timestamp("1970-01-02"), as_timestamp("86400"), as_timestamp(date(1970, 1, 2))
    (86400.0, 86400.0, 86400.0)
    """
    if moment is None:
        return None
    if isinstance(moment, bool):
        raise InvalidRequest(f"a time is epoch seconds, an ISO date or a datetime, got {moment!r}")
    if isinstance(moment, (int, float)):
        seconds = float(moment)
    elif isinstance(moment, datetime):
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(moment, date):
        seconds = datetime(moment.year, moment.month, moment.day, tzinfo=timezone.utc).timestamp()
    elif isinstance(moment, str):
        seconds = _parse_time(moment)
    else:
        raise InvalidRequest(f"a time is epoch seconds, an ISO date or a datetime, got {type(moment).__name__}")
    if not _EARLIEST <= seconds <= _LATEST:  # NaN fails too
        raise InvalidRequest(f"a time must lie between the years 1 and 9999, got {moment!r}")
    return seconds


def _parse_time(text: str) -> float:
    """Epoch seconds from ``"1717200000"``, ``"2025-06-01"`` or ``"2025-06-01T12:00[+02:00|Z]"``."""
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    if value.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not take "Z"
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"cannot read {text!r} as a time; use epoch seconds, 2025-06-01 or 2025-06-01T14:30 (UTC unless an "
            "offset is given)"
        ) from None
    return as_timestamp(parsed) or 0.0


def tag_values(tags: Any) -> list[str]:
    """The ``tag`` group keys of one call's tags (see the module text): ``"a"`` ->
    ``["a"]``; ``["a", "b", "a"]`` -> ``["a", "b"]``; ``{"team": "x", "v": 2}`` ->
    ``["team=x", "v=2"]``; ``None``, ``""``, ``[]``, ``{}`` -> ``[]``."""
    if tags is None or tags == "":
        return []
    if isinstance(tags, str):
        return [tags]
    if isinstance(tags, Mapping):
        values = [f"{key}={_tag_text(value)}" for key, value in tags.items()]
    elif isinstance(tags, (list, tuple)):
        values = [_tag_text(value) for value in tags]
    else:
        values = [_tag_text(tags)]
    return list(dict.fromkeys(values))


def _tag_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def format_usd(value: float | None) -> str:
    """A USD amount to read: three significant digits, at least cents (``"$0.00000500"``,
    ``"$0.00309"``, ``"$12.50"``); ``"unknown"`` for ``None``."""
    if value is None:
        return "unknown"
    if value == 0:
        return "$0.00"
    decimals = min(12, max(2, 2 - math.floor(math.log10(abs(value)))))
    return f"${value:,.{decimals}f}"


def _day(ts: float) -> str:
    """``"2025-06-01"``: the UTC day of ``ts``."""
    return _day_text(int(ts // 86_400))


def _hour(ts: float) -> str:
    """``"2025-06-01 14:00"``: the UTC hour of ``ts``."""
    return _hour_text(int(ts // 3_600))


# Formatting a datetime costs more than the rest of a row's tally; a ledger's rows
# fall in few days and hours, so each is formatted once (bounded caches).
@functools.lru_cache(maxsize=4096)
def _day_text(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, timezone.utc).strftime("%Y-%m-%d")


@functools.lru_cache(maxsize=16_384)
def _hour_text(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3_600, timezone.utc).strftime("%Y-%m-%d %H:00")


# Each key's values for one ledger row: one value, except for tags (none or several).
_KEY_VALUES: dict[str, Callable[[Mapping[str, Any]], list[Any]]] = {
    "day": lambda row: [_day(row["ts"])],
    "hour": lambda row: [_hour(row["ts"])],
    "tag": lambda row: tag_values(row.get("tags")) or [None],
}


def _group_keys(row: Mapping[str, Any], by: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """Every group ``row`` belongs to (one, unless it has several tags)."""
    parts = [_KEY_VALUES[key](row) if key in _KEY_VALUES else [row.get(key)] for key in by]
    return itertools.product(*parts)


def _sort_key(key: tuple[Any, ...]) -> tuple[tuple[bool, bool, Any], ...]:
    # None last; numbers before text so a column of mixed types still sorts.
    return tuple((value is None, isinstance(value, str), "" if value is None else value) for value in key)


# -- aggregation ---------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of sorted values, interpolating linearly between the two
    nearest ranks (numpy's and pandas' default); ``None`` for no values."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _models_text(models: set[str]) -> str:
    names = sorted(models)
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class _Tally:
    """Running sums of one group's rows."""

    __slots__ = (
        "cached_input_tokens", "calls", "costs", "errors", "hits", "input_tokens", "latencies", "output_tokens",
        "refusals", "saved", "saved_tokens", "unpriced", "unpriced_models", "unpriced_savings",
    )

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = self.cached_input_tokens = 0
        self.saved_tokens = self.hits = self.errors = self.refusals = 0
        self.unpriced = self.unpriced_savings = 0
        # Amounts are summed with math.fsum at the end: exact to the last bit, whatever
        # the order (a running float sum of 4,000 x 0.0004 is 1.599999999999889).
        self.costs: list[float] = []
        self.saved: list[float] = []
        self.unpriced_models: set[str] = set()
        self.latencies: list[float] = []

    def add(self, row: Mapping[str, Any]) -> None:
        input_tokens, output_tokens = int(row.get("input_tokens") or 0), int(row.get("output_tokens") or 0)
        saved_tokens = int(row.get("saved_tokens") or 0)
        self.calls += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_input_tokens += int(row.get("cached_input_tokens") or 0)
        self.saved_tokens += saved_tokens
        cost, saved = row.get("cost_usd"), row.get("saved_usd")
        if cost is not None:
            self.costs.append(cost)
        elif input_tokens or output_tokens:  # tokens spent at an unknown price
            self.unpriced += 1
            self.unpriced_models.add(str(row.get("model") or "an unnamed model"))
        if saved is not None:
            self.saved.append(saved)
        elif saved_tokens:
            self.unpriced_savings += 1
        self.hits += bool(row.get("cached"))
        if row.get("latency_s") is not None:
            self.latencies.append(float(row["latency_s"]))
        if row.get("stop_reason") in REFUSAL_REASONS:
            self.refusals += 1
        elif row.get("error") is not None and row.get("stop_reason") != "cancelled":  # a caller's choice
            self.errors += 1

    @property
    def cost(self) -> float:
        """The sum of the known costs."""
        return math.fsum(self.costs)

    def note(self) -> str | None:
        """Why a cost is unknown, or ``None`` when every cost is known."""
        parts = []
        if self.unpriced:
            calls = "call" if self.unpriced == 1 else "calls"
            parts.append(f"cost unknown: {self.unpriced} {calls} with no price ({_models_text(self.unpriced_models)})")
        if self.unpriced_savings:
            calls = "call" if self.unpriced_savings == 1 else "calls"
            parts.append(f"saved_usd unknown: {self.unpriced_savings} {calls} saved tokens with no price")
        return "; ".join(parts) or None

    def metrics(self) -> dict[str, Any]:
        """The :data:`METRICS` of the rows added so far."""
        ordered = sorted(self.latencies)
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cost_usd": None if self.unpriced else self.cost,
            "saved_tokens": self.saved_tokens,
            "saved_usd": None if self.unpriced_savings else math.fsum(self.saved),
            "cache_hit_rate": self.hits / self.calls if self.calls else None,
            "latency_p50_s": _percentile(ordered, 0.50),
            "latency_p95_s": _percentile(ordered, 0.95),
            "errors": self.errors,
            "refusals": self.refusals,
            "cost_note": self.note(),
        }


def _tally(rows: Iterable[Mapping[str, Any]], keys_of: Callable[[Mapping[str, Any]], Iterable[Any]]) -> list[
        tuple[Any, _Tally]]:
    """``(key, tally)`` per key that ``keys_of(row)`` gives, sorted by key."""
    tallies: dict[Any, _Tally] = {}
    for row in rows:
        for key in keys_of(row):
            tally = tallies.get(key)
            if tally is None:
                tally = tallies[key] = _Tally()
            tally.add(row)
    return [(key, tallies[key]) for key in sorted(tallies, key=_sort_key)]


def savings_parts(row: Mapping[str, Any]) -> Iterator[tuple[str, int, float | None]]:
    """``(mechanism, saved_tokens, saved_usd)`` for each mechanism that spared some of a
    row's saved tokens: ``"context"`` and ``"scope"`` from their own columns, and the
    rest to ``"cache"`` for a cache hit, else to the row's stop reason (``"repetition"``
    for the repetition stopper). ``saved_usd`` is ``None`` where the price is unknown."""
    rest_tokens, rest_usd = int(row.get("saved_tokens") or 0), row.get("saved_usd")
    for name in INPUT_MECHANISMS:
        tokens = int(row.get(f"{name}_saved_tokens") or 0)
        if tokens:
            usd = row.get(f"{name}_saved_usd")
            yield name, tokens, usd
            rest_tokens -= tokens
            rest_usd = None if rest_usd is None or usd is None else rest_usd - usd
    if rest_tokens > 0 or (rest_usd or 0) > 1e-15:
        yield ("cache" if row.get("cached") else str(row.get("stop_reason") or "unknown")), rest_tokens, rest_usd


def _savings(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What was saved per mechanism (see :func:`savings_parts`), sorted by name:
    ``mechanism``, ``calls`` (that it saved something in), ``saved_tokens``, ``saved_usd``
    (``None`` when any of it had no price)."""
    calls: dict[str, int] = {}
    tokens: dict[str, int] = {}
    usds: dict[str, list[float | None]] = {}
    for row in rows:
        for name, saved_tokens, saved_usd in savings_parts(row):
            calls[name] = calls.get(name, 0) + 1
            tokens[name] = tokens.get(name, 0) + saved_tokens
            usds.setdefault(name, []).append(saved_usd)
    return [
        {"mechanism": name, "calls": calls[name], "saved_tokens": tokens[name],
         "saved_usd": None if None in usds[name] else math.fsum(usds[name])}  # type: ignore[arg-type]
        for name in sorted(calls)
    ]


def _timeline(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The unit (``"hour"`` when the calls span under two days, else ``"day"``) and
    the metrics of every period from the first call's to the last one's, periods
    without calls included (as zeros), so that the spend chart's axis is time."""
    if not rows:
        return "day", []
    stamps = [row["ts"] for row in rows]
    unit = "hour" if max(stamps) - min(stamps) < 2 * 86_400 else "day"
    seconds, label = (3_600, _hour_text) if unit == "hour" else (86_400, _day_text)
    periods = dict(_tally(rows, lambda row: [(int(row["ts"] // seconds),)]))
    first, last = int(min(stamps) // seconds), int(max(stamps) // seconds)
    timeline = []
    for index in range(first, last + 1):
        tally = periods.get((index,)) or _Tally()
        timeline.append({"period": label(index), **tally.metrics(), "known_cost_usd": tally.cost})
    return unit, timeline


# -- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """Ledger rows grouped by :attr:`by` and summed (see the module text).

    :attr:`rows` holds one dict per group, sorted by its keys (``None`` last): the
    keys, then :data:`METRICS`. :attr:`totals` has the metrics over every call once
    (tags not exploded). :attr:`timeline` is the spend per day (per hour when the
    calls span under two days: :attr:`timeline_unit`) from the first call to the last,
    quiet periods included; each entry is a ``"period"``, the metrics and
    ``known_cost_usd`` (the sum of the costs that are known, which the spend chart
    draws). :attr:`savings` is what was saved per mechanism (``"cache"``,
    ``"context"`` fitting, ``"repetition"``, ``"scope"`` trimming, or another stop
    reason that saved tokens): ``mechanism``, ``calls``, ``saved_tokens``,
    ``saved_usd``. Iterating a report gives its rows.
    """

    by: tuple[str, ...]
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    savings: list[dict[str, Any]] = field(default_factory=list)
    timeline_unit: str = "day"
    since: float | None = None
    until: float | None = None

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        by: str | Iterable[str] = "model",
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> Report:
        """A report of ledger rows as :meth:`~tokenguard.Ledger.records` gives them
        (``tags`` decoded). ``since``/``until`` only label the report; filter first."""
        keys = report_keys(by)
        rows = list(records)
        unit, timeline = _timeline(rows)
        groups = _tally(rows, lambda row: _group_keys(row, keys))
        return cls(
            by=keys,
            rows=[dict(zip(keys, key, strict=True)) | tally.metrics() for key, tally in groups],
            totals=_totals(rows),
            timeline=timeline,
            savings=_savings(rows),
            timeline_unit=unit,
            since=since,
            until=until,
        )

    # -- plain data ------------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        """The rows' columns: the group keys, then :data:`METRICS`."""
        return [*self.by, *METRICS]

    @property
    def notes(self) -> list[str]:
        """What a reader must know: unknown prices, and how tagged calls are counted."""
        notes = []
        if self.totals["cost_note"]:
            note = self.totals["cost_note"]
            notes.append(f"{note[0].upper()}{note[1:]}.")
        if "tag" in self.by:
            notes.append("A call with several tags counts in each of their rows; the totals count it once.")
        return notes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        keys = ", ".join(self.by) or "nothing"
        cost = format_usd(self.totals["cost_usd"])
        text = f"<Report by {keys}: {len(self.rows)} rows, {self.totals['calls']} calls, cost {cost}"
        if not (_installed("pandas") and _installed("matplotlib")):
            text += f"; DataFrames, plots and HTML charts need: {INSTALL_REPORTS}"
        return text + ">"

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready data (``None`` for unknown values)."""
        return {
            "by": list(self.by),
            "since": self.since,
            "until": self.until,
            "columns": self.columns,
            "rows": self.rows,
            "totals": self.totals,
            "timeline_unit": self.timeline_unit,
            "timeline": self.timeline,
            "savings": self.savings,
            "notes": self.notes,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON (:meth:`to_dict`), written to ``path`` when given; returns the text."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2)
        return _write(path, text + "\n")

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The rows as CSV (header: :attr:`columns`; unknown values empty; no totals
        row), written to ``path`` when given; returns the text. A text cell that a
        spreadsheet would run as a formula (it starts with ``=``, ``+``, ``-``, ``@``, a
        tab or a carriage return: a user id or tag is anyone's to choose) starts with
        ``'`` instead."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({name: _inert(value) for name, value in row.items()} for row in self.rows)
        return _write(path, buffer.getvalue())

    def to_text(self) -> str:
        """An aligned text table of the rows and a totals line, then the notes."""
        return _text_table(self)

    # -- rendered (the reports extra) --------------------------------------------------

    def to_dataframe(self) -> Any:
        """The rows as a pandas ``DataFrame`` (unknown costs are NaN); ``df.attrs``
        holds ``totals`` and ``notes``. Needs the ``reports`` extra."""
        pd = _require("pandas", "pandas (for Report.to_dataframe)")
        frame = pd.DataFrame(self.rows, columns=self.columns)
        for name in _FLOAT_COLUMNS:
            frame[name] = frame[name].astype(float)
        frame.attrs["totals"] = dict(self.totals)
        frame.attrs["notes"] = self.notes
        return frame

    def plot(self) -> Figure:
        """A matplotlib ``Figure``: spend over time, tokens by group, savings by
        mechanism. Needs the ``reports`` extra."""
        figure_module = _require("matplotlib.figure", "matplotlib (for Report.plot)")
        figure: Figure = figure_module.Figure(figsize=(15, 4.8), layout="constrained")
        spend, tokens, saved = figure.subplots(1, 3)
        _plot_spend(spend, self.timeline, self.timeline_unit)
        _plot_tokens(tokens, self.rows, self.by)
        _plot_savings(saved, self.savings)
        return figure

    def to_html(self, path: str | os.PathLike[str] | None = None) -> str:
        """One self-contained HTML page: the table, the totals, the notes and the
        :meth:`plot` chart as an embedded PNG (no external files). Written to ``path``
        when given; returns the text. Needs the ``reports`` extra for the chart."""
        buffer = io.BytesIO()
        self.plot().savefig(buffer, format="png", dpi=100)
        chart = base64.b64encode(buffer.getvalue()).decode("ascii")
        page = _PAGE.format(
            title=html.escape(_title(self)),
            table=_html_table(self),
            chart=chart,
        )
        return _write(path, page)

    def _repr_html_(self) -> str:
        """The table Jupyter shows for a report (no extra needed)."""
        return f"<div><strong>{html.escape(_title(self))}</strong>{_html_table(self)}</div>"


def _totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    tally = _Tally()
    for row in rows:
        tally.add(row)
    return tally.metrics()


def _installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _require(module: str, what: str) -> Any:
    """Import ``module`` or raise :class:`~tokenguard.MissingDependency` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(what, INSTALL_REPORTS) from None


def _write(path: str | os.PathLike[str] | None, text: str) -> str:
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# -- text and HTML tables ------------------------------------------------------------------

_LABELS = {
    "calls": "calls",
    "input_tokens": "input",
    "output_tokens": "output",
    "cached_input_tokens": "cached in",
    "cost_usd": "cost $",
    "saved_tokens": "saved tok",
    "saved_usd": "saved $",
    "cache_hit_rate": "cache hits",
    "latency_p50_s": "p50 s",
    "latency_p95_s": "p95 s",
    "errors": "errors",
    "refusals": "refused",
    "cost_note": "note",
}


def _inert(value: Any) -> Any:
    """A CSV cell no spreadsheet runs as a formula (see :meth:`Report.to_csv`)."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _printable(text: str) -> str:
    """``text`` with control characters as escapes: an id must not move a terminal's
    cursor nor break a table's line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(column: str, value: Any) -> str:
    """How a value reads in a table (control characters escaped)."""
    if column in ("cost_usd", "saved_usd"):
        return "unknown" if value is None else f"{value:.6f}"
    if value is None:
        return "" if column in METRICS else "(none)"
    if column == "cache_hit_rate":
        return f"{value:.0%}"
    if column.startswith("latency_"):
        return f"{value:.3f}"
    if column in METRICS and isinstance(value, int):
        return f"{value:,}"
    return _printable(str(value))


def _shown_columns(report: Report) -> list[str]:
    """The table's columns: the note only when some row has one."""
    has_note = report.totals["cost_note"] or any(row["cost_note"] for row in report.rows)
    return [c for c in report.columns if c != "cost_note" or has_note]


def _title(report: Report) -> str:
    keys = ", ".join(report.by) or "all calls"
    span = ""
    if report.since is not None:
        span += f" from {_moment_text(report.since)}"
    if report.until is not None:
        span += f" until {_moment_text(report.until)}"
    return f"tokenguard usage by {keys}{span}"


def _moment_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _total_cells(report: Report, columns: Sequence[str]) -> list[str]:
    """The totals line: the metrics (its cost note is among the notes below the table)."""
    cells = [_cell(c, report.totals[c]) if c in METRICS and c != "cost_note" else "" for c in columns]
    if report.by:
        cells[0] = "total"
    return cells


def _text_table(report: Report) -> str:
    columns = _shown_columns(report)
    header = [_LABELS.get(c, c) for c in columns]
    body = [[_cell(c, row[c]) for c in columns] for row in report.rows]
    total = _total_cells(report, columns)
    widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(width) if column in METRICS and column != "cost_note" else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [_title(report), "", line(header), rule]
    if not report.rows:
        lines.append("(no calls)")
    lines += [line(cells) for cells in body]
    if report.by and report.rows:
        lines += [rule, line(total)]
    lines += ["", *report.notes]
    return "\n".join(lines) + "\n"


def _html_table(report: Report) -> str:
    columns = _shown_columns(report)

    def row_html(cells: list[str], tag: str = "td") -> str:
        items = "".join(
            f'<{tag} class="{"num" if c in METRICS and c != "cost_note" else "key"}">{html.escape(cell)}</{tag}>'
            for c, cell in zip(columns, cells, strict=True)
        )
        return f"<tr>{items}</tr>"

    head = row_html([_LABELS.get(c, c) for c in columns], "th")
    body = "".join(row_html([_cell(c, row[c]) for c in columns]) for row in report.rows)
    total = _total_cells(report, columns)
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in report.notes)
    return (
        '<table class="tokenguard-report" style="border-collapse:collapse;text-align:right">'
        f"<thead>{head}</thead><tbody>{body}</tbody><tfoot>{row_html(total)}</tfoot></table>"
        f'<ul style="font-size:smaller">{notes}</ul>'
    )


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.key, th.key {{ text-align: left; }}
tfoot td {{ font-weight: bold; border-top: 2px solid #888; }}
img {{ max-width: 100%; margin-top: 1.5em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{table}
<img alt="spend over time, tokens by group, savings by mechanism" src="data:image/png;base64,{chart}">
</body>
</html>
"""


# -- charts --------------------------------------------------------------------------------


def _plot_spend(ax: Axes, timeline: Sequence[Mapping[str, Any]], unit: str) -> None:
    """Known cost per period; a period with calls at an unknown price is hatched and
    marked '?' (its bar is only the known part)."""
    labels = [entry["period"] for entry in timeline]
    bars = ax.bar(range(len(labels)), [entry["known_cost_usd"] for entry in timeline], color="#4878a8")
    unknown = False
    for bar, entry in zip(bars, timeline, strict=True):
        if entry["cost_usd"] is None:
            unknown = True
            bar.set_hatch("//")
            ax.annotate("?", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    step = max(1, len(labels) // 12)
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=45, ha="right", fontsize=8)
    ax.set_title(f"spend per {unit} (USD)")
    if unknown:
        ax.set_xlabel("?: some calls have no known price; the bar is the known part", fontsize=8)
    if not timeline:
        ax.text(0.5, 0.5, "no calls", ha="center", va="center", transform=ax.transAxes)


def _plot_tokens(ax: Axes, rows: Sequence[Mapping[str, Any]], by: Sequence[str]) -> None:
    """Input and output tokens per group, the largest groups first."""
    ranked = sorted(rows, key=lambda row: row["input_tokens"] + row["output_tokens"], reverse=True)
    shown = ranked[:_TOP_KEYS_PLOTTED][::-1]
    # "$" would start matplotlib's math text (and a malformed one fails the chart).
    labels = [(" / ".join(_cell(key, row[key]) for key in by) or "all").replace("$", r"\$") for row in shown]
    inputs = [row["input_tokens"] for row in shown]
    ax.barh(labels, inputs, color="#4878a8", label="input")
    ax.barh(labels, [row["output_tokens"] for row in shown], left=inputs, color="#e49444", label="output")
    title = f"tokens by {', '.join(by) or 'all'}"
    if len(ranked) > len(shown):
        title += f" (top {len(shown)} of {len(ranked)})"
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=8)
    if shown:
        ax.legend(fontsize=8)


def _plot_savings(ax: Axes, savings: Sequence[Mapping[str, Any]]) -> None:
    """Saved tokens per mechanism, each bar labelled with its saved USD."""
    labels = [entry["mechanism"] for entry in savings]
    bars = ax.bar(labels, [entry["saved_tokens"] for entry in savings], color="#6a9f58")
    for bar, entry in zip(bars, savings, strict=True):
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        ax.annotate(format_usd(entry["saved_usd"]), top, ha="center", va="bottom", fontsize=8)
    ax.set_title("saved tokens by mechanism")
    if not savings:
        ax.text(0.5, 0.5, "no savings recorded", ha="center", va="center", transform=ax.transAxes)
