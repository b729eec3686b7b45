"""Several worker processes (tests/stress/_ledger_worker.py, started with
``sys.executable``) and threads of this process call through Guards on one SQLite
budget file and one SQLite ledger file at once.

tests/stress/test_guard_stress.py and test_budget_stress.py hold one global budget under
load; these add per-user and per-session budgets next to a global one (three holds per
call, across processes), USD limits, backend failures, and isolation: a user who
exhausts their budget never gets another user refused.
"""

from __future__ import annotations

from typing import Any

import pytest
from _ledger_worker import (
    SHARED_BUDGETS,
    SHARED_GLOBAL,
    SHARED_PER_SESSION,
    SHARED_PER_USER,
    SHARED_SESSION_EVERY,
    SHARED_USERS,
    Report,
    isolation_limit,
    isolation_threads,
    run_fleet,
    shared_threads,
    tokens_of,
)

import tokenguard as tg

PROCESSES = 3  # workers, plus this process
THREADS = 4  # per process
CALLS = 40  # per thread
MAX_OUT = 32


def _rows_match_report(ledger: tg.Ledger, report: Report, threads: list[list[dict[str, Any]]]) -> list[dict]:
    """Every thread made all its calls, each left exactly one ledger row whatever became
    of it, and each answered one's row says what its Reply said."""
    assert report.bad_lines == []
    assert report.calls == sum(t["calls"] for mine in threads for t in mine)
    rows = ledger.records()
    assert len(rows) == report.calls
    by_id = {row["request_id"]: row for row in rows}
    assert len(by_id) == len(rows)
    for rid, (user, tokens, _) in report.ok.items():
        assert (by_id[rid]["user"], tokens_of(by_id[rid])) == (user, tokens)
    return rows


def test_processes_and_threads_share_user_session_and_global_budgets(tmp_path):
    threads = shared_threads(PROCESSES + 1, THREADS, CALLS)
    report = run_fleet(tmp_path, SHARED_BUDGETS, threads, max_output_tokens=MAX_OUT, fail_rate=0.15)

    store = tmp_path / "budget.sqlite"
    per_user, overall = tg.Budget(**SHARED_PER_USER, store=store), tg.Budget(**SHARED_GLOBAL, store=store)
    per_session = tg.Budget(**SHARED_PER_SESSION, store=store)
    rows = _rows_match_report(tg.Ledger(tmp_path / "ledger.sqlite"), report, threads)

    total = 0
    for user in SHARED_USERS:
        spent = per_user.spent(user=user)
        mine = [row for row in rows if row["user"] == user]
        assert spent["reserved_tokens"] == 0 and spent["reserved_usd"] == 0
        assert spent["tokens"] <= SHARED_PER_USER["tokens"]
        assert spent["usd"] <= SHARED_PER_USER["usd"] + 1e-12
        assert spent["tokens"] == sum(tokens_of(row) for row in mine)
        # the store sums nano-USD rounded once per call; the ledger keeps the float
        assert spent["usd"] == pytest.approx(sum(row["cost_usd"] or 0 for row in mine), abs=1e-9 * len(mine) + 1e-12)
        total += spent["tokens"]
    sessions = {row["session"] for row in rows}
    assert len(sessions) == CALLS // SHARED_SESSION_EVERY
    for session in sessions:
        spent = per_session.spent(session=session)
        assert spent["reserved_tokens"] == 0
        assert spent["tokens"] <= SHARED_PER_SESSION["tokens"]
        assert spent["tokens"] == sum(tokens_of(row) for row in rows if row["session"] == session)
    spent = overall.spent()
    assert spent["reserved_tokens"] == 0
    assert spent["tokens"] <= SHARED_GLOBAL["tokens"]
    assert spent["tokens"] == total == sum(tokens_of(row) for row in rows)

    # Every budget refused calls, each only for the scope it limits; every refusal left a row.
    keys = {key for _, _, key in report.refused}
    assert "user:u0|" in keys and "global|" in keys
    assert any(key.startswith("session:") for key in keys)  # how many sessions run out depends on timing
    assert all(key in ("global|", f"user:{user}|", f"session:{session}|") for user, session, key in report.refused)
    assert len([row for row in rows if row["stop_reason"] == "budget_exceeded"]) == len(report.refused)
    assert report.errors  # some backends failed before answering: their holds were released


def test_a_user_exhausting_their_budget_never_refuses_another(tmp_path):
    threads = isolation_threads(PROCESSES + 1, hog_threads=3, hog_calls=CALLS, calls=CALLS // 2)
    # b's and c's calls fit the limit even at their worst case all at once, so only
    # someone else's spend counted in their scope could refuse them; hog asks for
    # several times the limit.
    limit = isolation_limit(threads, MAX_OUT)
    report = run_fleet(tmp_path, [{"tokens": limit, "per": "user"}], threads, max_output_tokens=MAX_OUT)

    budget = tg.Budget(tokens=limit, per="user", store=tmp_path / "budget.sqlite")
    rows = _rows_match_report(tg.Ledger(tmp_path / "ledger.sqlite"), report, threads)

    assert report.refused, "hog never ran out, so nothing was tested"
    assert set(report.refused) == {("hog", None, "user:hog|")}
    for user in ("b", "c"):
        answered = [rid for rid, (u, _, _) in report.ok.items() if u == user]
        assert len(answered) == sum(t["calls"] for mine in threads for t in mine if t["user"] == user)
    for user in ("hog", "b", "c"):
        spent = budget.spent(user=user)
        assert spent["reserved_tokens"] == 0
        assert spent["tokens"] <= limit
        assert spent["tokens"] == sum(tokens_of(row) for row in rows if row["user"] == user)
