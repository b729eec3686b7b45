"""4 processes x 16 threads share one Redis budget and one Redis ledger (a real
redis-server, tests/conftest.py): the budget is never overspent, nothing stays
held, and what it counts as spent is exactly what the ledger's rows sum to.

Each call reserves a random worst case, then fails (released, 10%) or writes its ledger
row and settles to a random actual use, as tests/stress/test_budget_stress.py does on
SQLite; every call, refused ones too, leaves one row.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import uuid
from typing import Any

import pytest

from tokenguard import Budget, Ledger
from tokenguard.errors import BudgetExceeded

PROCESSES = 4
THREADS = 16
CALLS = 40  # per thread
LIMIT_TOKENS = 20_000
LIMIT_USD = 0.02


def _call(budget: Budget, ledger: Ledger, rng: random.Random) -> None:
    worst = rng.randint(50, 400)
    try:
        reservation = budget.reserve(worst, worst * 1e-6)
    except BudgetExceeded:
        ledger.write({"stop_reason": "budget", "input_tokens": 0, "cost_usd": 0.0})
        return
    if rng.random() < 0.1:  # a failed call: released, its row still written
        reservation.release()
        ledger.write({"stop_reason": "error", "input_tokens": 0, "cost_usd": 0.0, "error": "x"})
        return
    actual = rng.randint(1, worst)
    ledger.write({"stop_reason": "stop", "input_tokens": actual, "cost_usd": actual * 1e-6})
    reservation.settle(actual, actual * 1e-6)


def _process(url: str, seed: int, go: Any) -> None:
    """One process: 16 threads on its own Budget and Ledger for ``url``, starting when
    every process is ready."""
    budget, ledger = Budget(tokens=LIMIT_TOKENS, usd=LIMIT_USD, store=url), Ledger(url)
    go.wait(120)

    def work(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        for _ in range(CALLS):
            _call(budget, ledger, rng)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_processes_and_threads_never_overspend_and_match_the_ledger(redis_server):
    url = redis_server.url(prefix=f"fleet-{uuid.uuid4().hex[:8]}:")
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_process, args=(url, seed, go)) for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0

    budget, ledger = Budget(tokens=LIMIT_TOKENS, usd=LIMIT_USD, store=url), Ledger(url)
    spent, totals = budget.spent(), ledger.totals()
    assert spent["reserved_tokens"] == 0 and spent["reserved_usd"] == 0
    assert spent["tokens"] <= LIMIT_TOKENS
    assert spent["usd"] <= LIMIT_USD + 1e-12
    assert spent["tokens"] == totals["input_tokens"]
    assert spent["usd"] == pytest.approx(totals["cost_usd"], abs=1e-9)
    rows = ledger.records()
    assert len(rows) == totals["calls"] == PROCESSES * THREADS * CALLS  # one row per call, none twice
    assert len({row["request_id"] for row in rows}) == len(rows)
    # The limit was reached, so refusals under contention were exercised.
    assert any(row["stop_reason"] == "budget" for row in rows)
