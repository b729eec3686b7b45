"""`tokenguard demo` (what `make demo` runs): the whole scripted session on the real
bundled model, in a subprocess, with each section's numbers checked against what this
process measures itself."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import tokenguard as tg
from tokenguard.demo import _BUDGET_TOKENS, _CHAT_CONTEXT_TOKENS, _LOOP_CAP, PRICED_AS, meter_line

BUNDLED = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "tokenguard", "demo"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def section(out: str, number: int) -> str:
    """The text of section ``number`` (up to the next header)."""
    match = re.search(rf"^== {number}\. .*?(?=^== |\Z)", out, re.S | re.M)
    assert match, f"no section {number} in:\n{out}"
    return match.group(0)


@pytest.mark.slow
def test_the_demo_loads_with_a_progress_bar_and_runs_every_section(demo):
    assert "Traceback" not in demo.stderr
    assert "loading: 100%" in demo.stderr and "4/4" in demo.stderr  # tqdm, on stderr
    out = demo.stdout
    assert re.search(rf"^loaded {BUNDLED} \(\w+ on \w+, context [\d,]+ tokens\) and the tokenizers in [\d.]+ s$",
                     out, re.M)
    assert f"at {PRICED_AS}'s catalogue rate" in out
    for number in range(1, 8):
        section(out, number)
    assert re.search(r"^demo finished in [\d.]+ s$", out, re.M)


@pytest.mark.slow
def test_exact_counts_are_the_tokenizers_own(demo):
    counting = section(demo.stdout, 1)
    english = re.search(r"English: '(.*)' \(", counting).group(1)  # type: ignore[union-attr]
    chinese = re.search(r"Chinese: '(.*)' \(", counting).group(1)  # type: ignore[union-attr]
    assert re.search(r"[\u4e00-\u9fff]", chinese)
    for model in ("gpt-4o", "gpt-4", BUNDLED):
        counts = f"{tg.count_tokens(english, model=model):>10}{tg.count_tokens(chinese, model=model):>10}"
        assert f"{model:<24}{counts}" in counting
    assert re.search(r"over the cap \([\d,]+ > 4,000\) in [\d.]+ ms", counting)


@pytest.mark.slow
def test_the_chat_is_metered_and_its_history_fitted(demo):
    chat = section(demo.stdout, 2)
    meters = re.findall(r"\[in (\d+)(?: \((\d+) from KV\))? · out (\d+) · (tail-only[^·]*)· .*session (\d+) tokens\]",
                        chat)
    assert len(meters) == 3
    totals = [int(m[4]) for m in meters]
    assert totals == sorted(totals) and totals[0] == int(meters[0][0]) + int(meters[0][2])
    assert all(int(m[0]) <= _CHAT_CONTEXT_TOKENS for m in meters)
    # By the third turn the history no longer fits: tail-only keeps the newest messages.
    assert "kept" in meters[2][3]
    whole, sent, spared = map(
        int, re.findall(r"context: the whole history is (\d+) tokens .* in (\d+), sparing (\d+)", chat)[-1])
    assert whole > _CHAT_CONTEXT_TOKENS >= sent == int(meters[2][0])
    assert spared > 0


@pytest.mark.slow
def test_the_second_question_is_a_cache_hit(demo):
    cache = section(demo.stdout, 3)
    assert "cache miss: the model answered in" in cache
    hit = re.search(r"cache hit: answered in [\d.]+ ms without the model, 0 tokens billed, (\d+) tokens saved", cache)
    assert hit, cache
    first = re.search(r"\[in (\d+) · out (\d+) · tail-only · cache miss", cache)
    assert first and int(hit.group(1)) == int(first.group(1)) + int(first.group(2))
    assert f"[in 0 · out 0 · tail-only · cache hit, saved {hit.group(1)} tokens" in cache


@pytest.mark.slow
def test_the_looping_list_is_stopped(demo):
    loop = section(demo.stdout, 4)
    stop = re.search(rf"repetition stop: the loop was cut after (\d+) of {_LOOP_CAP} tokens .*about (\d+) tokens", loop)
    assert stop, loop
    assert int(stop.group(1)) + int(stop.group(2)) == _LOOP_CAP
    assert "repetition stop, saved ~" in loop


@pytest.mark.slow
def test_the_budget_refuses_before_the_model_runs(demo):
    budget = section(demo.stdout, 5)
    assert f"({_BUDGET_TOKENS} tokens left)" in budget
    refusal = re.search(r"BudgetExceeded, before the model ran: .*needs up to (\d+) tokens, (\d+) left", budget)
    assert refusal, budget
    assert int(refusal.group(1)) > int(refusal.group(2))
    assert f"({refusal.group(2)} tokens left)" in budget  # the last question's line said so before it was asked


@pytest.mark.slow
def test_the_nested_call_is_at_depth_1_and_trimmed(demo):
    nested = section(demo.stdout, 6)
    parent = re.search(r"parent \(depth 0\): (\d+) input tokens", nested)
    child = re.search(r"child  \(depth 1\): handed (\d+) tokens \((\d+) messages\), sent (\d+) \((\d+) messages\)",
                      nested)
    assert parent and child, nested
    parent_in, handed, sent = int(parent.group(1)), int(child.group(1)), int(child.group(3))
    assert handed > parent_in and sent < handed
    assert int(child.group(4)) < int(child.group(2))
    spared = re.search(r"(\d+) tokens spared", nested)
    assert spared and int(spared.group(1)) > 0
    assert "kept: Note 9: Priya owns the billing code" in nested  # the note the question needs


@pytest.mark.slow
def test_the_run_ends_with_the_cost_report(demo):
    report = section(demo.stdout, 7)
    header = next(line for line in report.splitlines() if line.startswith("session "))
    assert header.split()[:4] == ["session", "calls", "input", "output"]
    rows = {line.split()[0]: line.split() for line in report.splitlines()
            if line.startswith(("demo-", "total "))}
    assert set(rows) == {"demo-budget", "demo-cache", "demo-chat", "demo-loop", "demo-nested", "total"}
    assert rows["demo-chat"][1] == "3" and rows["demo-cache"][1] == "2" and rows["demo-nested"][1] == "2"
    assert rows["demo-budget"][-1] == "1"  # one refusal
    assert int(rows["total"][1]) == sum(int(row[1]) for name, row in rows.items() if name != "total")
    assert float(rows["total"][5]) > 0  # priced at gpt-4o-mini's rate
    saved = dict(re.findall(r"(\w+) (\d+) tokens \(\$", report.split("saved by mechanism:")[1]))
    assert set(saved) == {"cache", "context", "repetition", "scope"} and all(int(n) > 0 for n in saved.values())


def test_the_meter_line():
    usage = tg.Usage(input_tokens=41, output_tokens=12, cost_usd=0.0)
    reply = tg.Reply("hi", "stop", [{"role": "user", "content": "hi"}], usage)
    assert meter_line(reply, strategy="tail-only", cache=True, session_tokens=53) == (
        "[in 41 · out 12 · tail-only · cache miss · $0.000000 · session 53 tokens]")
    usage = tg.Usage(input_tokens=80, output_tokens=117, cached_input_tokens=26, cost_usd=None, saved_tokens=203)
    looped = tg.Reply("1. Berries", "repetition", [{"role": "user", "content": "x"}] * 2, usage)
    assert meter_line(looped, strategy="tail-only", cache=False, session_tokens=300, given=5) == (
        "[in 80 (26 from KV) · out 117 · tail-only kept 2/5 msgs · cost unknown · repetition stop, saved ~203 tokens"
        " · session 300 tokens]")
    hit = tg.Reply("hi", "cache", [], tg.Usage(cost_usd=0.0, saved_tokens=50), cached=True)
    assert "· cache hit, saved 50 tokens ·" in meter_line(hit, strategy="no fitting", cache=True, session_tokens=0)
