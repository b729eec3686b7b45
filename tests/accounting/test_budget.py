"""Budgets: atomic reservations, settle/release, scopes, windows, both stores."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pytest

from tokenguard import Budget
from tokenguard.accounting import open_budget_store
from tokenguard.errors import BudgetExceeded, ConfigError, TokenGuardError
from tokenguard.stores import MemoryBudgetStore, SQLiteBudgetStore


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    return None if request.param == "memory" else str(tmp_path / "budget.sqlite")


def test_reserve_settle_release(store):
    b = Budget(tokens=100, store=store)
    r = b.reserve(60)
    assert b.spent()["reserved_tokens"] == 60
    with pytest.raises(BudgetExceeded) as info:
        b.reserve(50)
    assert info.value.unit == "tokens" and info.value.left == 40 and info.value.needed == 50
    assert "exceeded" in str(info.value)
    r.settle(30)
    assert b.spent() == {"tokens": 30, "usd": 0.0, "reserved_tokens": 0, "reserved_usd": 0.0}
    r.settle(30)  # settling twice is a no-op
    r.release()
    assert b.spent()["tokens"] == 30
    r2 = b.reserve(70)
    r2.release()
    assert b.spent()["tokens"] == 30 and b.remaining()["tokens"] == 70


def test_usd_budget_in_exact_units(store):
    b = Budget(usd=0.01, store=store)
    for _ in range(10):
        b.reserve(0, 0.001).settle(0, 0.001)
    assert b.spent()["usd"] == pytest.approx(0.01, abs=1e-12)
    with pytest.raises(BudgetExceeded) as info:
        b.reserve(0, 1e-9)
    assert info.value.unit == "usd"


def test_usd_budget_refuses_unknown_price():
    with pytest.raises(TokenGuardError, match="price is unknown"):
        Budget(usd=1).reserve(10, None)
    Budget(tokens=100).reserve(10, None).settle(10, None)  # a token budget needs no price


def test_per_user_and_session_scopes(store):
    b = Budget(tokens=10, per="user", store=store)
    b.reserve(10, user="alice").settle(10)
    with pytest.raises(BudgetExceeded):
        b.reserve(1, user="alice")
    b.reserve(10, user="bob").settle(10)
    s = Budget(tokens=10, per="session", store=store)
    s.reserve(10, session="a").settle(10)
    s.reserve(10, session="b").settle(10)
    assert s.spent(session="a")["tokens"] == 10


def test_windows_key_by_utc_period():
    now = datetime(2025, 6, 1, 13, 45, tzinfo=timezone.utc)
    assert Budget(tokens=1, window="hour").key(now=now) == "global|2025-06-01T13"
    assert Budget(tokens=1, window="day", per="user").key("al", now=now) == "user:al|2025-06-01"
    assert Budget(tokens=1, window="month", per="session").key(session="s", now=now) == "session:s|2025-06"
    assert Budget(tokens=1).key() == "global|"


def test_bad_arguments():
    with pytest.raises(ConfigError):
        Budget()
    with pytest.raises(ConfigError):
        Budget(tokens=1, per="team")
    with pytest.raises(ConfigError):
        Budget(tokens=1, window="week")
    with pytest.raises(ConfigError):
        Budget(tokens=1, store=42)


@pytest.mark.parametrize("limits", [{"tokens": float("nan")}, {"usd": float("nan")}, {"tokens": float("inf")},
                                    {"tokens": -1}, {"usd": -0.5}, {"tokens": "100"}, {"tokens": True},
                                    {"tokens": 1.5}])
def test_a_limit_that_is_no_finite_number_is_refused_not_unlimited(limits):
    # NaN compares false with everything: accepted, it would admit every call.
    with pytest.raises(ConfigError, match=r"a budget's (tokens|usd) must be a (finite|whole) number >= 0"):
        Budget(**limits)
    assert Budget(tokens=1e6).tokens == 1_000_000  # a whole number written as a float is one


def test_limits_of_any_real_number_type_hold():
    budget = Budget(tokens=np.int64(10), usd=np.float64(0.5))
    budget.reserve(10, usd=0.1).settle(10, usd=0.1)
    with pytest.raises(BudgetExceeded):
        budget.reserve(1, usd=0.0)


def test_stores_are_shared_by_path_and_names_keep_budgets_apart(tmp_path):
    path = tmp_path / "shared.sqlite"
    a, b = Budget(tokens=10, store=path), Budget(tokens=10, store=str(path))
    assert a.store is b.store and isinstance(a.store, SQLiteBudgetStore)
    a.reserve(4).settle(4)
    assert b.spent()["tokens"] == 4  # same name, same store: the same budget
    c = Budget(usd=1, store=path)
    assert c.name != a.name and c.spent()["tokens"] == 0
    assert isinstance(open_budget_store(None), MemoryBudgetStore)


def test_memory_store_prunes_old_windows():
    store = MemoryBudgetStore(max_keys=3)
    for day in ("2025-01-01", "2025-01-02", "2025-01-03", "2025-01-04"):
        assert store.reserve(day, "b", f"global|{day}", 1, 0, 10, None) is None
        store.settle(day, "b", f"global|{day}", 1, 0)
    assert len(store._totals) <= 3
    assert store.usage("b", "global|2025-01-04")[0] == 1


_HOLD_AND_DIE = """
import os, sys
from tokenguard import Budget
b = Budget(tokens=100, store=sys.argv[1])
b.reserve(90)
os._exit(0)  # dies holding its reservation
"""


def test_sqlite_reclaims_reservations_of_dead_processes(tmp_path):
    path = str(tmp_path / "dead.sqlite")
    subprocess.run([sys.executable, "-c", _HOLD_AND_DIE, path], check=True, timeout=60)
    b = Budget(tokens=100, store=path)
    assert b.spent()["reserved_tokens"] == 90
    b.reserve(50).settle(50)  # refused at first, then the dead hold is reclaimed
    assert b.spent() == {"tokens": 50, "usd": 0.0, "reserved_tokens": 0, "reserved_usd": 0.0}
    assert os.path.exists(path)
