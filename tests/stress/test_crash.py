"""A worker process calling through a Guard with two SQLite budgets and a SQLite ledger
is SIGKILLed at random moments, trial after trial on the same two files (real
processes, real SQLite; the worker is tests/stress/_ledger_worker.py).

After each kill: every call the worker reported answered has exactly one ledger row,
both files pass ``PRAGMA integrity_check``, the dead worker's holds are reclaimed
through the public API (a reservation of exactly what is left when nothing is held
succeeds) by this process once it has a Guard on the same files, as a later worker
would, and then each budget scope's spend equals exactly the ledger's sum for that
scope, over every trial so far.

The meter step commits a call's row, then the settle step its spend, in another file;
a kill between the two leaves a row and an open hold. Reclaiming that hold settles it
to what the row says the call spent (the Guard links its ledger to the budget store,
and each hold's id names its call), so no row goes uncounted.
"""

from __future__ import annotations

import random
import signal

from _ledger_worker import CRASH_USERS, kill_trial

#: SIGKILLs per run (benchmarks/reliability_report.py runs more).
KILL_TRIALS = 20


def test_sigkill_at_random_moments_loses_no_committed_row_and_leaves_no_hold(tmp_path):
    rng = random.Random(20_240_601)
    trials = []
    for n in range(KILL_TRIALS):
        trial = kill_trial(tmp_path, n, rng)
        trials.append(trial)
        where = f"trial {n}"
        assert trial.returncode == -signal.SIGKILL, f"{where}: the worker died by itself:\n{trial.stderr}"
        assert trial.bad_lines == [], where
        assert trial.lost == [], f"{where}: answered calls missing from the ledger"
        assert trial.duplicated == [], f"{where}: request ids with two ledger rows"
        assert trial.misreported == [], f"{where}: ledger rows that differ from the answered Reply"
        assert trial.integrity == {"ledger.sqlite": "ok", "budget.sqlite": "ok"}, where
        assert trial.reclaim_refused == [], f"{where}: a dead process's hold was not reclaimed"
        assert trial.held_after == 0, f"{where}: a hold is still open after reclaiming"
        assert trial.unexplained == [], f"{where}: spend moved by more than the calls it made"
        # One thread per user: at most one of its calls was in flight at the kill.
        for user in CRASH_USERS:
            assert len(trial.in_flight[f"user:{user}"]) <= 1, where
        # Every row the kill caught in flight is counted, by its settle or by reclaiming.
        assert trial.uncounted_tokens == dict.fromkeys(trial.uncounted_tokens, 0), where
        # usage after reclaiming == the ledger's sum, exactly, in every scope
        assert trial.spend_minus_ledger == dict.fromkeys(trial.spend_minus_ledger, 0), where

    # The trials did what they are for: kills landed while calls ran, and dead
    # processes' holds were there to reclaim.
    assert sum(t.killed_after_calls > 0 for t in trials) >= KILL_TRIALS // 2
    assert any(t.held_at_kill > 0 for t in trials)
