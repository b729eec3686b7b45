"""Many threads and processes against one budget: never overspent, spend == ledger sum.

These drive Budget and Ledger directly; tests/stress/test_guard_stress.py does the same
through Guard.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading

import pytest

from tokenguard import Budget, Ledger
from tokenguard.errors import BudgetExceeded

LIMIT_TOKENS = 20_000
LIMIT_USD = 0.02
CALLS_PER_WORKER = 40


def _call(budget: Budget, ledger: Ledger, rng: random.Random) -> None:
    worst = rng.randint(50, 400)
    worst_usd = worst * 1e-6
    try:
        r = budget.reserve(worst, worst_usd)
    except BudgetExceeded:
        ledger.write({"stop_reason": "budget", "input_tokens": 0, "cost_usd": 0.0})
        return
    if rng.random() < 0.1:  # a failed call: released, its row still written
        r.release()
        ledger.write({"stop_reason": "error", "input_tokens": 0, "cost_usd": 0.0, "error": "x"})
        return
    actual = rng.randint(1, worst)
    cost = actual * 1e-6
    ledger.write({"stop_reason": "stop", "input_tokens": actual, "cost_usd": cost})
    r.settle(actual, cost)


def _threads(budget: Budget, ledger: Ledger, n: int, seed: int) -> None:
    def work(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        for _ in range(CALLS_PER_WORKER):
            _call(budget, ledger, rng)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _check(budget: Budget, ledger: Ledger) -> None:
    spent = budget.spent()
    totals = ledger.totals()
    assert spent["reserved_tokens"] == 0 and spent["reserved_usd"] == 0
    assert spent["tokens"] <= LIMIT_TOKENS
    assert spent["usd"] <= LIMIT_USD + 1e-12
    assert spent["tokens"] == totals["input_tokens"]
    assert spent["usd"] == pytest.approx(totals["cost_usd"], abs=1e-9)
    # the limit was actually reached, so the test exercised refusals
    assert ledger.records(stop_reason="budget")


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_64_threads_one_budget(store, tmp_path):
    budget = Budget(
        tokens=LIMIT_TOKENS, usd=LIMIT_USD,
        store=None if store == "memory" else tmp_path / "b.sqlite",
    )
    ledger = Ledger(tmp_path / "ledger.sqlite")
    _threads(budget, ledger, 64, seed=1)
    _check(budget, ledger)


def _process(budget_path: str, ledger_path: str, seed: int) -> None:
    budget = Budget(tokens=LIMIT_TOKENS, usd=LIMIT_USD, store=budget_path)
    _threads(budget, Ledger(ledger_path), 16, seed)


def test_4_processes_one_budget(tmp_path):
    budget_path, ledger_path = str(tmp_path / "b.sqlite"), str(tmp_path / "l.sqlite")
    budget = Budget(tokens=LIMIT_TOKENS, usd=LIMIT_USD, store=budget_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process, args=(budget_path, ledger_path, s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    _check(budget, Ledger(ledger_path))
