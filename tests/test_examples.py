"""The scripts in examples/ run as a user runs them: each in a subprocess of this
Python, from a scratch directory, with its output checked. openai_decorator.py talks
to a real OpenAI-compatible server on 127.0.0.1 (tests/backends/openai_server.py),
given by argument or by OPENAI_BASE_URL. demo.py runs the bundled model and has its
own test (test_demo.py)."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from backends.openai_server import PROMPT_TOKENS, REPLY_WORDS, OpenAIServer

import tokenguard as tg

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
                ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME ARGS`` in ``cwd``, with no OPENAI_* settings of this
    process leaking in (``env`` adds some)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")} | (env or {})
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
    return done


def table_row(out: str, first: str) -> list[str]:
    """The cells of the report table's row for ``first`` (a user, or ``total``): the
    line that starts with it and goes on with a number, the calls."""
    rows = [cells for cells in map(str.split, out.splitlines()) if cells[:1] == [first] and cells[1:2] != []
            and cells[1].isdigit()]
    assert len(rows) == 1, f"no single row {first!r} in:\n{out}"
    return rows[0]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_says_what_it_shows_and_how_to_run_it(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and len(docstring.splitlines()[0]) > 20, f"{path.name} has no module docstring"
    assert f"examples/{path.name}" in docstring, f"{path.name}'s docstring does not say how to run it"


# -- openai_decorator.py -------------------------------------------------------------------

QUESTIONS = [("alice", "What is PagedAttention? One sentence."),
             ("alice", "And continuous batching? One sentence."),
             ("bob", "Why do chat histories get expensive? One sentence.")]


@pytest.mark.parametrize("given_by", ["argument", "environment"])
def test_the_openai_decorator_example_meters_a_real_server(given_by, tmp_path):
    with OpenAIServer() as server:
        if given_by == "argument":  # with an output cap of 4: the server stops at it
            done = run_example("openai_decorator.py", "--base-url", server.base_url, "--max-tokens", "4",
                               cwd=tmp_path)
            cap = 4
        else:
            done = run_example("openai_decorator.py", cwd=tmp_path, env={"OPENAI_BASE_URL": server.base_url})
            cap = 64
        requests = list(server.requests)
    out = done.stdout
    assert f"server: {server.base_url} (model gpt-4o-mini)" in out
    # What reached the server: each prompt as one user message, with the guard's output cap.
    assert [r["path"] for r in requests] == ["/v1/chat/completions"] * len(QUESTIONS)
    assert [r["body"] for r in requests] == [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": q}], "max_tokens": cap}
        for _, q in QUESTIONS
    ]
    words = REPLY_WORDS[:cap]
    finish = "length" if len(words) < len(REPLY_WORDS) else "stop"
    assert out.count(f"model > {''.join(words)}\n") == len(QUESTIONS)
    # The meter: the server's own usage (its prompt count), priced, and the guard's stop reason.
    meter = f"[in {PROMPT_TOKENS} · out {len(words)} · {finish} · $"
    assert out.count(meter) == len(QUESTIONS) and out.count(f"finish_reason={finish}]") == len(QUESTIONS)
    alice, bob, total = (table_row(out, name) for name in ("alice", "bob", "total"))
    assert alice[1:4] == ["2", str(2 * PROMPT_TOKENS), str(2 * len(words))]
    assert bob[1:4] == ["1", str(PROMPT_TOKENS), str(len(words))]
    assert total[1:4] == ["3", str(3 * PROMPT_TOKENS), str(3 * len(words))]


def test_the_openai_decorator_example_asks_for_a_server(tmp_path):
    done = run_example("openai_decorator.py", cwd=tmp_path, ok=False)
    assert done.returncode == 2 and "--base-url" in done.stderr and "OPENAI_BASE_URL" in done.stderr


# -- budgets_per_user.py -------------------------------------------------------------------

REFUSAL = re.compile(r"^(\w+) \((\d+) tokens left today\) > .*\n +refused before the model ran: BudgetExceeded by "
                     r"Budget\(tokens=150, per='user', window='day'\) for user:(\w+)\|[\d-]+: "
                     r"needs up to (\d+) tokens, (\d+) left$", re.M)
ANSWER = re.compile(r"^ *(\w+) \((\d+) tokens left today\) > .*\n +answered: in (\d+) \+ out (\d+) tokens, \$[\d.]+$",
                    re.M)


def test_the_budgets_example_refuses_alice_and_serves_bob(tmp_path):
    out = run_example("budgets_per_user.py", cwd=tmp_path).stdout
    refusals = REFUSAL.findall(out)
    assert len(refusals) == 1, out
    user, left_shown, scope, needed, left = refusals[0]
    assert user == scope == "alice" and left == left_shown and int(needed) > int(left)
    answers = ANSWER.findall(out)
    assert [a[0] for a in answers] == ["alice", "bob", "alice", "alice", "bob"]
    # What each user has left is the allowance less what their answered calls used.
    spent = {name: sum(int(a[2]) + int(a[3]) for a in answers if a[0] == name) for name in ("alice", "bob")}
    for name in spent:
        assert f"{name}: {spent[name]} of 150 tokens spent today" in out
    assert int(left) == 150 - spent["alice"]
    assert "no user given: refused as InvalidRequest: budget 'user/day/tokens' is per user" in out
    assert "refusals in the ledger: 1 (alice)" in out
    assert table_row(out, "alice")[-1] == "1" and table_row(out, "bob")[-1] == "0"  # the report's refused column
    assert table_row(out, "total")[1] == "7"  # every call is a ledger row, the refused ones too


def test_the_budgets_example_shares_its_budget_through_a_store(tmp_path):
    store = tmp_path / "budgets.sqlite"
    first = run_example("budgets_per_user.py", "--store", str(store), cwd=tmp_path).stdout
    second = run_example("budgets_per_user.py", "--store", str(store), cwd=tmp_path).stdout
    assert store.is_file()
    assert first.splitlines()[0].startswith("alice (150 tokens left today) >")
    # The second run starts from what the first one spent (in the same UTC day).
    left = int(re.match(r"alice \((\d+) tokens left today\)", second).group(1))  # type: ignore[union-attr]
    assert left < 150 and len(REFUSAL.findall(second)) > len(REFUSAL.findall(first))


# -- cost_report.py ------------------------------------------------------------------------


def test_the_cost_report_example_exports_csv_json_and_html(tmp_path):
    out = run_example("cost_report.py", cwd=tmp_path).stdout
    folder = tmp_path / "cost-report"
    for name in ("usage.csv", "usage.json", "usage.html"):
        assert re.search(rf"^wrote cost-report/{name} \([\d,]+ bytes\)$", out, re.M), out
    data = json.loads((folder / "usage.json").read_text(encoding="utf-8"))
    assert data["by"] == ["user", "model"]
    assert [(r["user"], r["model"], r["calls"]) for r in data["rows"]] == [
        ("alice", "gpt-4o-mini", 3), ("bob", "gpt-4o", 2), ("carol", "gpt-4o-mini", 3)]
    totals = data["totals"]
    assert totals["calls"] == 8 and totals["refusals"] == 1 and totals["errors"] == 0
    assert totals["cost_usd"] > 0 and totals["input_tokens"] == sum(r["input_tokens"] for r in data["rows"])
    assert [(s["mechanism"], s["calls"]) for s in data["savings"]] == [("cache", 1)]
    with (folder / "usage.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == data["columns"]
    assert [(r["user"], r["model"], int(r["calls"]), int(r["input_tokens"])) for r in rows] == [
        (r["user"], r["model"], r["calls"], r["input_tokens"]) for r in data["rows"]]
    page = (folder / "usage.html").read_text(encoding="utf-8")
    assert '<table class="tokenguard-report"' in page and "data:image/png;base64," in page
    assert table_row(out, "total")[1] == "8"


def test_the_cost_report_example_reports_a_ledger_file(tmp_path):
    path = tmp_path / "usage.sqlite"
    guard = tg.Guard(lambda messages, max_tokens: "ok", model="gpt-4o-mini", ledger=path)
    for user in ("ann", "ann", "ben"):
        guard.complete("hello", user=user, tags=["demo"])
    guard.close()
    run_example("cost_report.py", "--ledger", str(path), "--by", "user,tag", "--out", "out", cwd=tmp_path)
    with tg.Ledger(path) as ledger:
        expected = ledger.report(by="user,tag")
    assert (tmp_path / "out" / "usage.csv").read_text(encoding="utf-8") == expected.to_csv()
    assert json.loads((tmp_path / "out" / "usage.json").read_text(encoding="utf-8")) == json.loads(expected.to_json())


def test_the_cost_report_example_refuses_a_missing_ledger(tmp_path):
    done = run_example("cost_report.py", "--ledger", "nothing.sqlite", cwd=tmp_path, ok=False)
    assert done.returncode == 2 and "no ledger file at nothing.sqlite" in done.stderr
    assert not (tmp_path / "nothing.sqlite").exists()


# -- strategies_compared.py ----------------------------------------------------------------


def test_the_strategies_example_shows_what_each_strategy_sent_spared_and_remembered(tmp_path):
    out = run_example("strategies_compared.py", "--budget", "250", "--turns", "40", cwd=tmp_path).stdout
    whole = int(re.search(r"the chat: \d+ messages, (\d+) tokens", out).group(1))  # type: ignore[union-attr]
    comparison = out.split("\n\n")[1]  # the table before the ledger's report
    rows = {cells[0]: cells for cells in map(str.split, comparison.splitlines()[1:])}
    assert sorted(rows) == ["Retrieval", "Summary", "TailOnly"]
    for name, cells in rows.items():
        sent, spared = int(cells[1]), int(cells[2])
        assert sent <= 250 and sent + spared == whole, name  # gpt-4o-mini's accounting adds up exactly
    assert "I don't know" in " ".join(rows["TailOnly"])  # the newest turns alone forget the fact
    assert "4417" in " ".join(rows["Summary"]) and "4417" in " ".join(rows["Retrieval"])
    total_spared = sum(int(cells[2]) for cells in rows.values())
    assert f"saved by context: {total_spared} tokens" in out
    assert table_row(out, "total")[1] == "3"
