"""Guarded calls against one SQLite budget file and one SQLite ledger file, for
tests/stress/test_crash.py, tests/stress/test_processes.py and
benchmarks/reliability_report.py.

Run as a script, ``python _ledger_worker.py '<config JSON>'`` is one worker process.
The config: ``ledger`` and ``budget_store`` (SQLite paths), ``budgets`` (``Budget``
keyword arguments, one dict per budget), ``max_output_tokens``, ``fail_rate``,
``report`` (a file), ``threads`` (see :func:`run_threads`) and optionally ``go`` (a
path). It builds a :class:`~tokenguard.Guard` on a plain function backend
(:func:`make_guard`), runs one thread per entry of ``threads`` (each calls as its user,
``calls`` times, or until the process is killed when ``calls`` is ``null``) and, after
each call returns, appends one line to the ``report`` file with a single ``os.write``,
so nothing sits in a buffer that a SIGKILL could lose::

    start <pid>                                    before the Guard is built
    ready <pid>                                    Guard built, tokenizer loaded (then, with a
                                                   ``go`` file in the config, it waits for that file)
    ok <request_id> <user> <tokens> <nano_usd>     answered: ledger row written, budgets settled
    refused <user> <session> <key>                 a budget refused the call (key: the scope it refused;
                                                   session "-" when the call named none)
    error <user>                                   the backend failed

Imported, it holds what the tests and the report share: the worker's thread loop (a
test process runs the same threads next to the workers), the report parser, and one
kill trial (:func:`kill_trial`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import tokenguard as tg

WORKER = Path(__file__).resolve()
MODEL = "gpt-4o"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


# -- the worker -------------------------------------------------------------------------


def prompt_for(user: str, seed: int, i: int) -> str:
    """The ``i``-th prompt of a thread: deterministic, so a test can count its worst case."""
    rng = random.Random(f"{user}/{seed}/{i}")
    return f"{user} {seed} {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def worst_tokens(user: str, seed: int, calls: int, max_output_tokens: int) -> int:
    """What a thread's ``calls`` calls reserve in all: exact input + the output cap each."""
    return sum(
        tg.count_tokens([{"role": "user", "content": prompt_for(user, seed, i)}], model=MODEL) + max_output_tokens
        for i in range(calls)
    )


def make_guard(config: dict[str, Any]) -> tg.Guard:
    """The Guard a worker calls through: a function backend that answers 1 to 60 random
    words (often past the output cap) and fails before answering at ``fail_rate``."""
    fail_rate = float(config.get("fail_rate", 0.0))

    def backend(messages: list[dict[str, Any]], max_tokens: int) -> str:
        rng = random.Random(messages[-1]["content"])
        if rng.random() < fail_rate:
            raise ConnectionError("dropped")
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))

    budgets = [tg.Budget(**spec, store=config["budget_store"]) for spec in config["budgets"]]
    # Random words repeat; the repetition stopper is not what these tests are about.
    return tg.Guard(
        backend, model=MODEL, max_output_tokens=config["max_output_tokens"], budget=budgets,
        ledger=config["ledger"], stop=None, telemetry=False,
    )


def emit(fd: int, line: str) -> None:
    """One line, one ``write`` to an ``O_APPEND`` file: whole or absent, never buffered."""
    os.write(fd, (line + "\n").encode())


def call_loop(guard: tg.Guard, user: str, seed: int, calls: int | None, fd: int, session_every: int | None) -> None:
    """One thread's calls, each reported after it returns. With ``session_every``, calls
    ``[0, n)`` name session ``s0``, ``[n, 2n)`` ``s1``, and so on: threads started
    together move through the sessions together."""
    i = 0
    while calls is None or i < calls:
        session = None if session_every is None else f"s{i // session_every}"
        try:
            reply = guard.complete(prompt_for(user, seed, i), user=user, session=session)
        except tg.BudgetExceeded as refusal:
            emit(fd, f"refused {user} {session or '-'} {refusal.key}")
        except (ConnectionError, tg.BackendError):
            emit(fd, f"error {user}")
        else:
            nano_usd = round((reply.usage.cost_usd or 0.0) * 1e9)
            emit(fd, f"ok {reply.request_id} {user} {reply.usage.total_tokens} {nano_usd}")
        i += 1


def run_threads(guard: tg.Guard, threads: Sequence[dict[str, Any]], report: str | os.PathLike[str]) -> None:
    """Run ``threads`` (``{"user", "seed", "calls"}`` each, and optionally
    ``"session_every"``, see :func:`call_loop`) through ``guard``, started together,
    reporting to ``report``; returns when all are done."""
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        gate = threading.Barrier(len(threads))

        def work(spec: dict[str, Any]) -> None:
            gate.wait()
            call_loop(guard, spec["user"], spec["seed"], spec["calls"], fd, spec.get("session_every"))

        pool = [threading.Thread(target=work, args=(spec,)) for spec in threads]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        os.close(fd)


def main(config: dict[str, Any]) -> None:
    fd = os.open(config["report"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    emit(fd, f"start {os.getpid()}")
    guard = make_guard(config)
    guard.tokenizer.count("warm up")  # loaded now, not by the first call
    emit(fd, f"ready {os.getpid()}")
    os.close(fd)
    if config.get("go"):  # start calling together with the other processes
        while not os.path.exists(config["go"]):
            time.sleep(0.001)
    run_threads(guard, config["threads"], config["report"])
    guard.close()


# -- the parent's side --------------------------------------------------------------------


def start_worker(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    """A worker process on ``config`` (stderr kept for a failure message)."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@dataclass
class Report:
    """What one report file says."""

    started: bool = False
    ready: int = 0  # workers that got as far as calling
    ok: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # request_id -> (user, tokens, nano_usd)
    refused: list[tuple[str, str | None, str]] = field(default_factory=list)  # (user, session, key)
    errors: list[str] = field(default_factory=list)  # user
    bad_lines: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.ok) + len(self.refused) + len(self.errors)


def read_report(paths: Iterable[str | os.PathLike[str]]) -> Report:
    """The lines of one or more report files; a line that does not parse goes to ``bad_lines``."""
    report = Report()
    for path in paths:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            parts = line.split(" ")
            if parts[0] == "start" and len(parts) == 2:
                report.started = True
            elif parts[0] == "ready" and len(parts) == 2:
                report.ready += 1
            elif parts[0] == "ok" and len(parts) == 5 and parts[1] not in report.ok:
                report.ok[parts[1]] = (parts[2], int(parts[3]), int(parts[4]))
            elif parts[0] == "refused" and len(parts) == 4:
                report.refused.append((parts[1], None if parts[2] == "-" else parts[2], parts[3]))
            elif parts[0] == "error" and len(parts) == 2:
                report.errors.append(parts[1])
            else:
                report.bad_lines.append(line)
    return report


def integrity(path: str | os.PathLike[str]) -> str:
    """``PRAGMA integrity_check`` of a SQLite file, on a connection of its own: ``"ok"``
    or SQLite's list of problems."""
    conn = sqlite3.connect(path, timeout=60)
    try:
        return "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def tokens_of(row: dict[str, Any]) -> int:
    return int(row["input_tokens"]) + int(row["output_tokens"])


def reclaim(budget: tg.Budget, user: str | None) -> tuple[int, bool]:
    """Through the public API, reclaim every hold of a dead process in one budget scope:
    reserve exactly what is left when nothing is held, and release it. That fits only
    once every hold is gone, and a hold whose process is dead is reclaimed when a
    reservation would otherwise be refused; a hold that stays (a live process's, or a
    dead one's that is kept) refuses it. Reclaiming settles a hold whose call's ledger
    row was written, so what is left shrinks: when the first try is refused and no hold
    is left, it tries once more with what is left now. Returns the tokens held before,
    and whether the reservation was refused."""
    assert budget.tokens is not None and budget.usd is None, "reclaim() needs a tokens-only budget"
    spent = budget.spent(user=user)
    held = int(spent["reserved_tokens"])
    for _ in range(2):
        try:
            budget.reserve(budget.tokens - int(spent["tokens"]), user=user).release()
        except tg.BudgetExceeded:
            spent = budget.spent(user=user)
            if spent["reserved_tokens"]:
                break
        else:
            return held, False
    return held, True


# -- processes and threads at once ----------------------------------------------------------


def run_fleet(
    workdir: Path,
    budgets: list[dict[str, Any]],
    threads: Sequence[Sequence[dict[str, Any]]],
    *,
    max_output_tokens: int,
    fail_rate: float = 0.0,
) -> Report:
    """One worker process per entry of ``threads`` but the last, which this process runs
    in its own threads; all on one budget file and one ledger file in ``workdir``, and
    all starting together once every worker has its Guard ready. Raises
    :class:`RuntimeError` when a worker fails. Returns every call's report."""
    base = {
        "ledger": str(workdir / "ledger.sqlite"), "budget_store": str(workdir / "budget.sqlite"),
        "budgets": budgets, "max_output_tokens": max_output_tokens, "fail_rate": fail_rate,
        "go": str(workdir / "go"),
    }
    configs = [{**base, "report": str(workdir / f"report-{p}.txt"), "threads": list(mine)}
               for p, mine in enumerate(threads)]
    procs = [start_worker(config) for config in configs[:-1]]
    local = configs[-1]
    guard = make_guard(local)
    try:
        deadline = time.monotonic() + 120
        while read_report(config["report"] for config in configs[:-1]).ready < len(procs):
            if any(proc.poll() is not None for proc in procs) or time.monotonic() > deadline:
                raise RuntimeError("a worker died or hung before it was ready")
            time.sleep(0.005)
        Path(base["go"]).touch()
        run_threads(guard, local["threads"], local["report"])
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    finally:
        guard.close()
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker exited with {proc.returncode}:\n{stderr.decode(errors='replace')}")
    return read_report(config["report"] for config in configs)


#: Three budgets on every call, so each call holds three reservations:
#: - per user (USD binds first: a call costs about $0.0004 on gpt-4o, 60 tokens); half
#:   of every process's threads call as u0, who exhausts it early, the others spread
#:   over u1-u3;
#: - per session: every thread moves through sessions s0, s1, ... in step with the
#:   others (``SHARED_SESSION_EVERY`` calls each), so every thread of every process
#:   contends for each session's small limit at once, and each is crossed in turn;
#: - global, less than what the users' and the sessions' limits let through together,
#:   so it binds last.
SHARED_USERS = ("u0", "u1", "u2", "u3")
SHARED_PER_USER = {"tokens": 2_000, "usd": 0.006, "per": "user"}
SHARED_PER_SESSION = {"tokens": 600, "per": "session"}
SHARED_GLOBAL = {"tokens": 3_000, "per": "global"}
SHARED_BUDGETS = [SHARED_PER_USER, SHARED_PER_SESSION, SHARED_GLOBAL]
SHARED_SESSION_EVERY = 4


def shared_threads(processes: int, threads: int, calls: int) -> list[list[dict[str, Any]]]:
    """``processes`` lists of ``threads`` thread specs, for :func:`run_fleet`."""
    out = []
    for p in range(processes):
        users = ["u0"] * (threads // 2) + [SHARED_USERS[1 + (p + k) % 3] for k in range(threads - threads // 2)]
        out.append([{"user": user, "seed": p * 100 + k, "calls": calls, "session_every": SHARED_SESSION_EVERY}
                    for k, user in enumerate(users)])
    return out


def isolation_threads(processes: int, hog_threads: int, hog_calls: int, calls: int) -> list[list[dict[str, Any]]]:
    """In every process, ``hog_threads`` threads call as "hog", one as "b", one as "c"."""
    return [
        [{"user": "hog", "seed": p * 100 + k, "calls": hog_calls} for k in range(hog_threads)]
        + [{"user": user, "seed": p, "calls": calls} for user in ("b", "c")]
        for p in range(processes)
    ]


def isolation_limit(threads: Sequence[Sequence[dict[str, Any]]], max_output_tokens: int) -> int:
    """A per-user limit that b's and c's calls fit even if every one of them held its
    worst case at once (the larger of their two sums), so nothing they do themselves
    can refuse them; hog's calls ask for several times as much."""
    need = {user: 0 for user in ("b", "c")}
    for mine in threads:
        for t in mine:
            if t["user"] in need:
                need[t["user"]] += worst_tokens(t["user"], t["seed"], t["calls"], max_output_tokens)
    return max(need.values())


# -- one kill trial ---------------------------------------------------------------------

CRASH_USERS = ("u0", "u1", "u2")
CRASH_LIMIT = 10**12  # tokens per user: never reached, so every call reserves and settles
CRASH_BUDGETS: list[dict[str, Any]] = [
    {"tokens": CRASH_LIMIT, "per": "user"},
    {"tokens": 3 * CRASH_LIMIT, "per": "global"},
]


def crash_config(workdir: Path, trial: int) -> dict[str, Any]:
    """One worker, one thread per user (so at most one call per user is in flight when
    it is killed), calling until killed; two budgets, so every call holds two reservations."""
    return {
        "ledger": str(workdir / "ledger.sqlite"),
        "budget_store": str(workdir / "budget.sqlite"),
        "report": str(workdir / f"report-{trial}.txt"),
        "budgets": CRASH_BUDGETS,
        "max_output_tokens": 32,
        "fail_rate": 0.05,
        "threads": [{"user": user, "seed": trial, "calls": None} for user in CRASH_USERS],
    }


@dataclass
class Trial:
    """What one kill left behind, measured after the worker is dead."""

    returncode: int
    stderr: str
    killed_after_calls: int  # calls the worker reported before the kill (answered, refused, failed)
    answered: int  # of which answered
    bad_lines: list[str]
    lost: list[str]  # reported answered, absent from the ledger
    duplicated: list[str]  # request ids with more than one ledger row
    misreported: list[str]  # reported tokens differ from the row's
    integrity: dict[str, str]  # file name -> integrity_check
    held_at_kill: int  # tokens a dead process still held, over every scope, before reclaiming
    held_after: int  # tokens still held after reclaiming (must be 0)
    reclaim_refused: list[str]  # scopes where what is left with nothing held could not be reserved
    in_flight: dict[str, list[int]]  # scope -> tokens of rows metered this trial but never reported
    settled_on_reclaim: dict[str, int]  # scope -> tokens reclaiming settled: rows the kill cut from their settle
    uncounted_tokens: dict[str, int]  # scope -> tokens of in-flight rows the spend lacks after reclaiming (0)
    unexplained: list[str]  # scopes whose spend moved by anything but reported + some in-flight calls
    spend_minus_ledger: dict[str, int]  # scope -> spent tokens minus ledger tokens, after this trial (0)


def _subset_sums(values: Sequence[int]) -> dict[int, int]:
    """Each reachable sum of a subset of ``values`` -> the fewest values reaching it."""
    sums: dict[int, int] = {}
    for k in range(len(values) + 1):
        for combo in combinations(values, k):
            sums.setdefault(sum(combo), k)
    return sums


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Until ``path`` holds a line starting with ``needle`` (the worker must stay alive)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and any(line.startswith(needle) for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            return  # died by itself: the trial reports its return code
        time.sleep(0.001)
    raise TimeoutError(f"the worker never wrote {needle!r} to {path}")


def kill_trial(workdir: Path, trial: int, rng: random.Random) -> Trial:
    """Start a worker on the budget and ledger files in ``workdir`` (kept across trials),
    SIGKILL it at a random moment, and measure what it left.

    Even trials kill a worker that is calling (0-50 ms after its first answered call);
    odd ones 0-1 s after it started building its Guard (opening the files, loading the
    tokenizer, the first calls). After the kill: every reported call's ledger row, the
    files' integrity, the holds the dead worker left (reclaimed through the public API,
    :func:`reclaim`, in this process once it has a Guard on the same files, as a later
    worker would: the Guard links its ledger to the budget store, so a hold whose call
    has a row is settled from that row), and how each budget scope's spend moved
    against the ledger.
    """
    config = crash_config(workdir, trial)
    ledger = tg.Ledger(config["ledger"])
    budgets = [tg.Budget(**spec, store=config["budget_store"]) for spec in CRASH_BUDGETS]
    scopes = [(budgets[0], user) for user in CRASH_USERS] + [(budgets[1], None)]

    def spent_now() -> dict[str, int]:
        return {f"{b.per}:{u}": int(b.spent(user=u)["tokens"]) for b, u in scopes}

    before = spent_now()
    rows_before = len(ledger.records())
    report_path = Path(config["report"])

    proc = start_worker(config)
    try:
        if trial % 2 == 0:
            _wait_for(report_path, "ok ", proc)
            time.sleep(rng.uniform(0, 0.05))
        else:
            _wait_for(report_path, "start ", proc)
            time.sleep(rng.uniform(0, 1.0))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()  # reaped: a zombie still answers kill(pid, 0) as alive
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()

    report = read_report([report_path])
    integrity_ = {name: integrity(workdir / name) for name in ("ledger.sqlite", "budget.sqlite")}
    rows = ledger.records()
    new_rows = rows[rows_before:]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    lost = [rid for rid in report.ok if rid not in by_id]
    duplicated = [rid for rid, found in by_id.items() if len(found) > 1]
    misreported = [
        rid for rid, (user, tokens, _) in report.ok.items()
        if rid in by_id and (by_id[rid][0]["user"], tokens_of(by_id[rid][0])) != (user, tokens)
    ]

    reaper = make_guard(config)  # a later worker's Guard on the same files
    try:
        at_kill = spent_now()
        reclaimed = [reclaim(b, u) for b, u in scopes]
    finally:
        reaper.close()
    held_at_kill = sum(held for held, _ in reclaimed)
    reclaim_refused = [f"{b.per}:{u}" for (b, u), (_, refused) in zip(scopes, reclaimed, strict=True) if refused]
    held_after = sum(int(b.spent(user=u)["reserved_tokens"]) for b, u in scopes)
    after = spent_now()

    # Each scope's spend moved by the reported calls plus every call in flight at the
    # kill whose row was written (never reported): settled by its own settle step, or,
    # when the kill came between its row and its settle, by reclaiming its hold.
    in_flight: dict[str, list[int]] = {}
    uncounted_tokens: dict[str, int] = {}
    unexplained: list[str] = []
    for budget, user in scopes:
        scope = f"{budget.per}:{user}"
        mine = (lambda r, u=user: r["user"] == u) if user is not None else (lambda r: True)
        reported = sum(t for rid, (u, t, _) in report.ok.items() if user is None or u == user)
        pending = [tokens_of(r) for r in new_rows if mine(r) and r["request_id"] not in report.ok and tokens_of(r)]
        in_flight[scope] = pending
        moved = after[scope] - before[scope] - reported
        if moved not in _subset_sums(pending):
            unexplained.append(f"{scope}: spend moved {after[scope] - before[scope]}, reported {reported}, "
                               f"in flight {pending}")
        uncounted_tokens[scope] = sum(pending) - moved
    total_ledger = {f"{b.per}:{u}": sum(tokens_of(r) for r in rows if u is None or r["user"] == u) for b, u in scopes}
    return Trial(
        returncode=proc.returncode,
        stderr=stderr,
        killed_after_calls=report.calls,
        answered=len(report.ok),
        bad_lines=report.bad_lines,
        lost=lost,
        duplicated=duplicated,
        misreported=misreported,
        integrity=integrity_,
        held_at_kill=held_at_kill,
        held_after=held_after,
        reclaim_refused=reclaim_refused,
        in_flight=in_flight,
        settled_on_reclaim={scope: after[scope] - at_kill[scope] for scope in after},
        uncounted_tokens=uncounted_tokens,
        unexplained=unexplained,
        spend_minus_ledger={scope: after[scope] - total_ledger[scope] for scope in after},
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
