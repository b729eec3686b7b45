"""A dead process's hold in a SQLite or Redis budget store is settled from its call's ledger row
when the process died after the meter step wrote the row and before the settle step
(tests/stress/test_crash.py kills at random moments; these tests kill at the two
moments that matter, deterministically)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import tokenguard as tg
from tokenguard.accounting.budget import charge, link_ledger
from tokenguard.stores import SQLiteBudgetStore
from tokenguard.stores.base import request_id_of, reservation_id

PRICES = {"gpt-4o": (2.5, 10.0)}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(proc.stdout)


def hold_of(store: SQLiteBudgetStore, pid: int, rid: str, key: str, tokens: int, nano_usd: int = 0) -> None:
    """A hold in budget ``b`` taken by process ``pid``."""
    assert store.reserve(rid, "b", key, tokens, nano_usd, None, None) is None
    with store.db.transaction() as conn:
        conn.execute("UPDATE reservations SET pid = ? WHERE id = ?", (pid, rid))


def reap(store: SQLiteBudgetStore, key: str) -> None:
    """Reclaim the dead holds in budget ``b``, scope ``key``: a reservation under a limit
    of 0 is refused while anything is held, and a refusal reclaims dead holds."""
    assert store.reserve("probe", "b", key, 0, 0, 0, None) is not None
    assert store.usage("b", key)[2] == 0


def test_reservation_ids_name_their_call():
    assert request_id_of(reservation_id("abc123", "user/all/tokens")) == "abc123"
    assert request_id_of("0123456789abcdef") is None  # a hold taken outside a call
    assert request_id_of("#b") is None
    budget = tg.Budget(tokens=100)
    assert budget.reserve(10, request_id="abc123").id == reservation_id("abc123", budget.name)
    assert request_id_of(budget.reserve(10).id) is None


def test_charge_is_what_the_settle_step_counts():
    assert charge(0, 0.0) is None and charge(0, None) is None
    assert charge(12, None) == (12, 0)
    assert charge(12, 0.000123456789) == (12, 123457)
    assert charge(0, 1e-9) == (0, 1)


def test_a_dead_hold_settles_to_what_the_lookup_says_else_is_released(tmp_path):
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")
    pid = dead_pid()
    hold_of(store, pid, reservation_id("written", "b"), "global|", 100, 5_000)
    hold_of(store, pid, reservation_id("unwritten", "b"), "global|", 100, 5_000)
    hold_of(store, pid, "plain-uuid", "global|", 100, 5_000)
    asked: list[str] = []

    def lookup(request_id: str) -> tuple[int, int] | None:
        asked.append(request_id)
        return (37, 1_234) if request_id == "written" else None

    store.add_settled_lookup(lookup)
    reap(store, "global|")
    assert store.usage("b", "global|") == (37, 1_234, 0, 0)
    assert sorted(asked) == ["unwritten", "written"]  # the plain id names no call


def test_every_hold_of_a_dead_process_settles_in_its_own_budget_and_scope(tmp_path):
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")
    pid = dead_pid()
    hold_of(store, pid, reservation_id("call", "b"), "user:ann|", 100)
    assert store.reserve(reservation_id("call", "g"), "g", "global|", 100, 0, None, None) is None
    with store.db.transaction() as conn:
        conn.execute("UPDATE reservations SET pid = ?", (pid,))
    store.add_settled_lookup(lambda request_id: (40, 7))
    reap(store, "user:ann|")
    assert store.usage("b", "user:ann|") == (40, 7, 0, 0)
    assert store.usage("g", "global|") == (40, 7, 0, 0)


def test_lookups_are_asked_in_turn_one_per_key(tmp_path):
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")
    store.add_settled_lookup(lambda request_id: None, key="a")
    store.add_settled_lookup(lambda request_id: (1, 1), key="b")
    store.add_settled_lookup(lambda request_id: (9, 9), key="b")  # replaces the first "b"
    hold_of(store, dead_pid(), reservation_id("call", "b"), "global|", 100)
    reap(store, "global|")
    assert store.usage("b", "global|") == (9, 9, 0, 0)


def test_a_lookup_that_fails_keeps_the_hold(tmp_path, caplog):
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")

    def broken(request_id: str) -> tuple[int, int] | None:
        raise OSError("the ledger is gone")

    store.add_settled_lookup(broken)
    hold_of(store, dead_pid(), reservation_id("call", "b"), "global|", 100)
    assert store.reserve("probe", "b", "global|", 1, 0, 100, None) is not None  # still held: refused
    assert store.usage("b", "global|") == (0, 0, 100, 0)
    assert "its dead hold is kept" in caplog.text


def test_a_live_process_hold_is_never_reaped(tmp_path):
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")
    store.add_settled_lookup(lambda request_id: (1, 0))
    assert store.reserve(reservation_id("mine", "b"), "b", "global|", 100, 0, None, None) is None
    assert store.reserve("probe", "b", "global|", 1, 0, 100, None) is not None
    assert store.usage("b", "global|") == (0, 0, 100, 0)


def test_a_guard_links_a_shared_ledger_once_and_an_in_process_one_never(tmp_path):
    path = tmp_path / "budget.sqlite"
    budget = tg.Budget(tokens=100, store=path)
    store = budget.store
    assert isinstance(store, SQLiteBudgetStore)
    tg.Guard(lambda messages, max_tokens: "hi", model="gpt-4o", budget=budget, telemetry=False)  # in-memory ledger
    tg.Guard(lambda messages, max_tokens: "hi", model="gpt-4o", budget=budget, ledger=tg.Ledger(None), telemetry=False)
    assert len(store._lookups) == 0
    for _ in range(3):
        tg.Guard(lambda messages, max_tokens: "hi", model="gpt-4o", budget=budget, ledger=tmp_path / "ledger.sqlite",
                 telemetry=False)
    assert len(store._lookups) == 1
    link_ledger([budget], tg.Ledger(tmp_path / "other.sqlite"))
    assert len(store._lookups) == 2


def test_the_ledger_finds_a_call_by_its_request_id(tmp_path):
    ledger = tg.Ledger(tmp_path / "ledger.sqlite")
    rid = ledger.write({"input_tokens": 3, "tags": {"a": 1}})
    assert ledger.find(rid)["input_tokens"] == 3
    assert ledger.find(rid)["tags"] == {"a": 1}
    assert ledger.find("nope") is None
    with ledger.store.db.connection() as conn:  # type: ignore[attr-defined]
        plan = " ".join(str(row) for row in conn.execute("EXPLAIN QUERY PLAN SELECT * FROM calls WHERE request_id = ?",
                                                          ("x",)))
    assert "calls_request_id" in plan


# -- a real process, killed at the moment that matters --------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import tokenguard as tg
    from tokenguard.pipeline import meter, settle

    config = json.loads(sys.argv[1])
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    if config["kill_before"] == "settle":
        settle.Settle.__call__ = die
    else:
        meter.Meter.__call__ = die
    budgets = [tg.Budget(**spec, store=config["store"]) for spec in config["budgets"]]
    guard = tg.Guard(lambda messages, max_tokens: "one two three four five", model="gpt-4o", budget=budgets,
                     ledger=config["ledger"], prices=config["prices"], stop=None, telemetry=False)
    guard.complete("hello there", user="ann")
    """
)
BUDGETS = [{"tokens": 10_000, "usd": 1.0, "per": "user"}, {"tokens": 10_000, "per": "global"}]


def _killed_call(tmp_path: Path, kill_before: str) -> None:
    config = {"store": str(tmp_path / "budget.sqlite"), "ledger": str(tmp_path / "ledger.sqlite"),
              "budgets": BUDGETS, "prices": PRICES, "kill_before": kill_before}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _reclaim(budgets: list[tg.Budget]) -> None:
    scopes = list(zip(budgets, ("ann", None), strict=True))
    assert all(budget.spent(user=user)["reserved_tokens"] > 0 for budget, user in scopes)  # the dead holds
    for budget, user in scopes:
        assert budget.tokens is not None
        # The whole limit fits only with nothing held: refused at first, which reclaims the
        # dead process's holds (in every budget); refused still where reclaiming settled one.
        with contextlib.suppress(tg.BudgetExceeded):
            budget.reserve(budget.tokens, 0.0, user=user).release()
    assert all(budget.spent(user=user)["reserved_tokens"] == 0 for budget, user in scopes)


def test_killed_between_its_row_and_its_settle_the_call_is_counted_exactly(tmp_path):
    _killed_call(tmp_path, "settle")
    [row] = tg.Ledger(tmp_path / "ledger.sqlite").records()
    assert row["output_tokens"] > 0 and row["cost_usd"] > 0
    budgets = [tg.Budget(**spec, store=tmp_path / "budget.sqlite") for spec in BUDGETS]
    # a later worker's Guard on the same files
    tg.Guard(lambda messages, max_tokens: "", model="gpt-4o", budget=budgets, ledger=tmp_path / "ledger.sqlite",
             prices=PRICES, telemetry=False)
    _reclaim(budgets)
    tokens = row["input_tokens"] + row["output_tokens"]
    nano = round(row["cost_usd"] * 1e9)
    reclaimed = [b.store.usage(b.name, b.key(user=u)) for b, u in zip(budgets, ("ann", None), strict=True)]
    assert reclaimed == [(tokens, nano, 0, 0)] * 2  # every budget counts the call's cost, as settle does
    # ... exactly what the settle step counts for the same call when nothing kills it
    control = [tg.Budget(**spec, store=tmp_path / "control.sqlite") for spec in BUDGETS]
    guard = tg.Guard(lambda messages, max_tokens: "one two three four five", model="gpt-4o", budget=control,
                     ledger=tmp_path / "control-ledger.sqlite", prices=PRICES, stop=None, telemetry=False)
    guard.complete("hello there", user="ann")
    assert [b.store.usage(b.name, b.key(user=u)) for b, u in zip(control, ("ann", None), strict=True)] == reclaimed


def test_killed_before_its_row_the_hold_is_released(tmp_path):
    _killed_call(tmp_path, "meter")
    assert tg.Ledger(tmp_path / "ledger.sqlite").records() == []
    budgets = [tg.Budget(**spec, store=tmp_path / "budget.sqlite") for spec in BUDGETS]
    tg.Guard(lambda messages, max_tokens: "", model="gpt-4o", budget=budgets, ledger=tmp_path / "ledger.sqlite",
             prices=PRICES, telemetry=False)
    _reclaim(budgets)
    assert budgets[0].store.usage(budgets[0].name, budgets[0].key(user="ann")) == (0, 0, 0, 0)
    assert budgets[1].store.usage(budgets[1].name, budgets[1].key()) == (0, 0, 0, 0)


def test_without_a_linked_ledger_the_hold_is_released(tmp_path):
    """What a process with no Guard on the ledger does: it cannot know the call spent."""
    _killed_call(tmp_path, "settle")
    # A store of its own: this process's shared one may have lookups from other tests' guards.
    budgets = [tg.Budget(**spec, store=SQLiteBudgetStore(tmp_path / "budget.sqlite")) for spec in BUDGETS]
    _reclaim(budgets)
    assert budgets[1].store.usage(budgets[1].name, budgets[1].key()) == (0, 0, 0, 0)
    assert os.path.exists(tmp_path / "ledger.sqlite")


def test_on_redis_a_call_killed_between_its_row_and_its_settle_is_counted_once_its_hold_expires(redis_server):
    url = redis_server.url(prefix=f"dead-{os.urandom(6).hex()}:", reservation_ttl_s=1)
    config = {"store": url, "ledger": url, "budgets": BUDGETS, "prices": PRICES, "kill_before": "settle"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    [row] = tg.Ledger(url).records()
    budgets = [tg.Budget(**spec, store=url) for spec in BUDGETS]
    tg.Guard(lambda messages, max_tokens: "", model="gpt-4o", budget=budgets, ledger=url, prices=PRICES,
             telemetry=False)
    scopes = list(zip(budgets, ("ann", None), strict=True))
    assert all(budget.spent(user=user)["reserved_tokens"] > 0 for budget, user in scopes)  # held until the TTL
    tokens, nano = row["input_tokens"] + row["output_tokens"], round(row["cost_usd"] * 1e9)
    deadline = time.monotonic() + 30
    while any(budget.spent(user=user)["reserved_tokens"] for budget, user in scopes):
        assert time.monotonic() < deadline, "the dead process's holds never expired"
        time.sleep(0.1)
    # Expired, each hold was settled from the call's row: what the settle step would have counted.
    assert [b.store.usage(b.name, b.key(user=u)) for b, u in scopes] == [(tokens, nano, 0, 0)] * 2


def in_another_container(store: SQLiteBudgetStore, rid: str, pid: int, age_s: float = 0.0) -> None:
    """Make hold ``rid`` look taken by process ``pid`` of another PID namespace (a
    container sharing the file), ``age_s`` seconds ago."""
    with store.db.transaction() as conn:
        conn.execute("UPDATE reservations SET pid = ?, pidns = pidns + 1, created = created - ? WHERE id = ?",
                     (pid, age_s, rid))


def test_a_hold_from_another_pid_namespace_is_not_taken_for_dead_by_its_pid(tmp_path):
    # Its pid means nothing here: a live container's call would be reaped, and the
    # budget overspent, had its pid been looked up in this namespace.
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")
    hold_of(store, os.getpid(), "theirs", "k", 59)
    in_another_container(store, "theirs", dead_pid())
    assert store.reserve("mine", "b", "k", 59, 0, 100, None) is not None  # still held: refused
    assert store.usage("b", "k")[2] == 59
    assert store.settle("theirs", "b", "k", 59, 0) and store.usage("b", "k")[:3] == (59, 0, 0)


def test_a_stale_foreign_hold_is_released_and_its_late_settlement_still_counts(tmp_path):
    from tokenguard.stores.sqlite_budget import FOREIGN_HOLD_MAX_AGE_S

    store = SQLiteBudgetStore(tmp_path / "budget.sqlite")
    hold_of(store, os.getpid(), "theirs", "k", 59)
    in_another_container(store, "theirs", os.getpid(), age_s=FOREIGN_HOLD_MAX_AGE_S + 1)
    assert store.reserve("probe", "b", "k", 1, 0, 1, None) is None  # past the age: taken for dead, released
    store.release("probe")
    # Its process was alive after all: its spend counts when it settles, once.
    assert store.settle("theirs", "b", "k", 40, 0) and store.usage("b", "k")[:3] == (40, 0, 0)
    assert not store.settle("theirs", "b", "k", 40, 0) and store.usage("b", "k")[0] == 40


def test_a_file_from_before_pid_namespaces_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE reservations (id TEXT PRIMARY KEY, budget TEXT NOT NULL, key TEXT NOT NULL, "
                 "tokens INTEGER NOT NULL, nano_usd INTEGER NOT NULL, pid INTEGER NOT NULL, created REAL NOT NULL)")
    conn.execute("INSERT INTO reservations VALUES ('old', 'b', 'k', 30, 0, ?, 0)", (dead_pid(),))
    conn.commit()
    conn.close()
    store = SQLiteBudgetStore(path)
    assert store.reserve("new", "b", "k", 80, 0, 100, None) is None  # the old dead hold, of this namespace, reaped
    assert store.usage("b", "k") == (0, 0, 80, 0)
