"""64 threads and 4 processes through Guard against one budget: the budget is never
overspent and its spend equals the ledger's sum (real SQLite, real tokenizer)."""

from __future__ import annotations

import multiprocessing as mp
import random
import threading

import pytest

from tokenguard import Budget, Guard, Ledger
from tokenguard.errors import BudgetExceeded

LIMIT_TOKENS = 30_000
LIMIT_USD = 0.05
MAX_OUT = 40
CALLS = 25
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def backend(messages, *, max_tokens):
    """Streams a random number of words; sometimes far past max_tokens, sometimes fails."""
    rng = random.Random(messages[-1]["content"])
    n = rng.randint(1, 80)
    for i in range(n):
        if rng.random() < 0.01:
            raise ConnectionError("dropped")
        yield WORDS[i % len(WORDS)] + " "


def _guard(budget_store, ledger_path) -> Guard:
    budget = Budget(tokens=LIMIT_TOKENS, usd=LIMIT_USD, store=budget_store)
    # The backend cycles through WORDS, a loop the repetition stopper would end; this
    # test is about budgets under load, so the caps must be reached instead.
    return Guard(
        backend, model="gpt-4o-mini", max_output_tokens=MAX_OUT, budget=budget, ledger=ledger_path, stop=None
    )


def _hammer(guard: Guard, threads: int, seed: int) -> None:
    def work(k: int) -> None:
        rng = random.Random(seed * 10_000 + k)
        for i in range(CALLS):
            prompt = f"{seed}-{k}-{i} " + "word " * rng.randint(1, 60)
            try:
                if rng.random() < 0.5:
                    guard.complete(prompt, user=f"u{k % 4}")
                else:
                    stream = guard.stream(prompt)
                    for _ in stream:
                        if rng.random() < 0.05:
                            stream.close()  # the caller walks away midway
                            break
            except (BudgetExceeded, ConnectionError):
                pass

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _check(budget: Budget, ledger: Ledger) -> None:
    spent = budget.spent()
    rows = ledger.records()
    assert spent["reserved_tokens"] == 0 and spent["reserved_usd"] == 0
    assert spent["tokens"] <= LIMIT_TOKENS and spent["usd"] <= LIMIT_USD + 1e-12
    assert spent["tokens"] == sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    assert spent["usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows), abs=1e-9)
    reasons = {r["stop_reason"] for r in rows}
    assert "budget_exceeded" in reasons and "length" in reasons  # refusals and caps happened
    assert all(r["output_tokens"] <= MAX_OUT for r in rows)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_64_threads_through_one_guard(store, tmp_path):
    guard = _guard(None if store == "memory" else tmp_path / "b.sqlite", tmp_path / "l.sqlite")
    _hammer(guard, 64, seed=1)
    _check(guard.budgets[0], guard.ledger)


def _process(budget_path: str, ledger_path: str, seed: int) -> None:
    _hammer(_guard(budget_path, ledger_path), 8, seed)


def test_4_processes_share_one_budget(tmp_path):
    budget_path, ledger_path = str(tmp_path / "b.sqlite"), str(tmp_path / "l.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process, args=(budget_path, ledger_path, s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    guard = _guard(budget_path, ledger_path)
    _check(guard.budgets[0], guard.ledger)
