"""What a hostile input costs the input cap, per tokenizer family and input class; and
what SIGKILLs and concurrent processes do to a SQLite budget and ledger.

    .venv/bin/python benchmarks/reliability_report.py [--quick] [--repeats 5]
        [--kill-trials 100] [--fleet-runs 5] [--crash-only]

Prints one table: for each tokenizer family (gpt-4o / o200k_base, cl100k_base, the
bundled SmolLM2 GGUF vocabulary, Mistral's SentencePiece model from mistral-common) and
each input class (English prose, Chinese, spaces, newlines, tabs, random digits,
punctuation (dashes, which o200k packs 64 to a token), one emoji repeated, random
Unicode) at 1 MB and 100 MB (``--quick``: 1 MB only), the
time of ``count_until(text, 4000)`` (median of ``--repeats`` runs, after one warm-up
run) and its ratio to the median over the classes of that tokenizer and size. Target:
the slowest class within 10x of the median, so that no input class (a megabyte of
spaces, say) buys more CPU than any other. The last rows time
``Guard(max_input_tokens=2000).complete(text)`` on gpt-4o's slowest class and on spaces.

Texts are built one class at a time (a 100 MB string each); random Unicode is 1 MB of
random code points (no surrogates) repeated. Takes under a minute, ``--quick`` a few
seconds, once the tokenizers have loaded.

Then a second table, crash safety and processes, from the worker and checks of
tests/stress/test_crash.py and test_processes.py with more runs than the tests:
``--kill-trials`` SIGKILLs of a worker calling through a Guard with two SQLite budgets
and a SQLite ledger (every answered call's row kept, both files intact, the dead
worker's holds reclaimed, and then every budget's spend equal to the ledger's sum),
and ``--fleet-runs`` runs each of three worker processes plus this one, four threads
each, sharing per-user, per-session and global budgets (never over a limit, spend
equal to the ledger) and per-user budgets where one user exhausts theirs (nobody else
refused). Every loss count must read 0. About one
second per kill trial and five per fleet run on two cores; ``--crash-only`` skips the
tokenizer table, ``--kill-trials 0 --fleet-runs 0`` the second.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tokenguard as tg

LIMIT = 4000
GUARD_LIMIT = 2000
MB = 1_000_000

PROSE = (
    "Large language models read tokens, not characters; a bill is a count of tokens. "
    "The quick brown fox jumps over the lazy dog, and the guard counts every word of it. "
)
CHINESE = "大型语言模型按令牌计费，而不是按字符。精确计数可以避免意外的账单。人工智能正在改变世界。"
CLASSES = [
    "English prose", "Chinese", "spaces", "newlines", "tabs", "digits", "punctuation", "one emoji", "random Unicode",
]


def random_unicode(nbytes: int, seed: int = 0) -> str:
    """Random code points from the first three planes (no surrogates), ``nbytes`` of UTF-8."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < nbytes:
        cp = rng.randrange(0x20, 0x30000)
        if 0xD800 <= cp <= 0xDFFF:
            continue
        out.append(chr(cp))
        size += len(out[-1].encode())
    return "".join(out)


def make_text(kind: str, nbytes: int) -> str:
    """About ``nbytes`` of UTF-8 of one input class."""

    def fill(unit: str) -> str:
        return unit * (nbytes // len(unit.encode()) + 1)

    if kind == "digits":
        return fill("".join(random.Random(1).choice("0123456789") for _ in range(997)))
    if kind == "random Unicode":
        return random_unicode(MB) * max(1, nbytes // MB)
    units = {"English prose": PROSE, "Chinese": CHINESE, "spaces": " ", "newlines": "\n", "tabs": "\t",
             "punctuation": "-", "one emoji": "😀"}
    return fill(units[kind])


def tokenizers() -> list[tuple[str, tg.Tokenizer]]:
    """The four families; one whose data package is missing is left out with a note."""
    found = [("gpt-4o (o200k)", tg.get_tokenizer("gpt-4o")), ("gpt-4 (cl100k)", tg.get_tokenizer("gpt-4"))]
    try:
        found.append(("SmolLM2 (GGUF)", tg.get_tokenizer("SmolLM2-135M-Instruct")))
    except tg.MissingDependency as e:
        print(f"(SmolLM2 left out: {e})")
    try:
        dist = importlib.metadata.distribution("mistral-common")
        model = Path(str(dist.locate_file("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")))
        found.append(("Mistral (SentencePiece)", tg.get_tokenizer(model)))
    except (importlib.metadata.PackageNotFoundError, tg.UnknownTokenizer) as e:
        print(f"(SentencePiece left out: {e})")
    return found


def median_ms(repeats: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up: a tokenizer reads its run characters from the vocabulary once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 MB inputs only")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (default 5)")
    parser.add_argument("--kill-trials", type=int, default=100, help="SIGKILLed workers (default 100; tests: 20)")
    parser.add_argument("--fleet-runs", type=int, default=5, help="runs of each multi-process scenario (default 5)")
    parser.add_argument("--crash-only", action="store_true", help="only the crash-safety and processes table")
    parser.add_argument("--fuzz", type=int, default=3000, help="hostile payloads through the entry points")
    parser.add_argument("--no-runner", action="store_true", help="skip the bundled runner's leak check")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}")
    if not args.crash_only:
        token_tables(args)
    if args.kill_trials or args.fleet_runs:
        crash_table(args.kill_trials, args.fleet_runs)
    if not args.crash_only:
        fault_table(args.fuzz, runner=not args.no_runner)


def token_tables(args: argparse.Namespace) -> None:
    """The count_until table and the Guard refusal rows."""
    sizes = [1] if args.quick else [1, 100]
    families = tokenizers()
    # times[(family, size)][class] in ms
    times: dict[tuple[str, int], dict[str, float]] = {(name, mb): {} for name, _ in families for mb in sizes}
    for mb in sizes:
        for kind in CLASSES:
            text = make_text(kind, mb * MB)
            for name, tokenizer in families:
                result = tokenizer.count_until(text, LIMIT)
                assert result > LIMIT, (name, kind, mb, result)
                times[(name, mb)][kind] = median_ms(args.repeats, lambda t=tokenizer, s=text: t.count_until(s, LIMIT))
            del text

    header = f"{'tokenizer':<24} {'input class':<15}" + "".join(
        f" {f'{mb} MB ms':>10} {'x median':>9}" for mb in sizes
    )
    print(f"\ncount_until(text, {LIMIT}): median of {args.repeats} runs; ratio to the median over classes")
    print(header)
    print("-" * len(header))
    worst_ratio = 0.0
    for name, _ in families:
        medians = {mb: statistics.median(times[(name, mb)].values()) for mb in sizes}
        for kind in CLASSES:
            cells = ""
            for mb in sizes:
                ms = times[(name, mb)][kind]
                cells += f" {ms:10.3f} {ms / medians[mb]:8.1f}x"
            print(f"{name:<24} {kind:<15}{cells}")
        for mb in sizes:
            slowest = max(times[(name, mb)], key=times[(name, mb)].__getitem__)
            ratio = times[(name, mb)][slowest] / medians[mb]
            worst_ratio = max(worst_ratio, ratio)
            print(f"{'':<24} {mb} MB: median {medians[mb]:.3f} ms, slowest {slowest} at {ratio:.1f}x the median")
        print()

    guard = tg.Guard(lambda messages, max_tokens: "ok", model="gpt-4o", max_input_tokens=GUARD_LIMIT)
    o200k = families[0][0]
    for mb in sizes:
        slowest = max(times[(o200k, mb)], key=times[(o200k, mb)].__getitem__)
        for kind, why in ((slowest, "gpt-4o's slowest class"), ("spaces", "the whitespace attack")):
            guard_row(guard, kind, why, mb, args.repeats)
    verdict = "met" if worst_ratio <= 10 else "MISSED"
    print(f"\nslowest class / median, worst over tokenizers and sizes: {worst_ratio:.1f}x (target <= 10x: {verdict})")


def guard_row(guard: tg.Guard, kind: str, why: str, mb: int, repeats: int) -> None:
    """Time the guard refusing ``mb`` MB of one class (it must refuse it)."""
    text = make_text(kind, mb * MB)

    def refuse() -> None:
        try:
            guard.complete(text)
        except tg.InputTooLong:
            return
        raise AssertionError("the guard answered an input over its cap")

    ms = median_ms(repeats, refuse)
    print(f"Guard(max_input_tokens={GUARD_LIMIT}).complete({mb} MB of {kind}, {why}): {ms:.3f} ms, refused")


def _worker() -> Any:
    """tests/stress/_ledger_worker.py: the worker process and the checks the tests use."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "stress"))
    import _ledger_worker

    return _ledger_worker


def kill_rows(worker: Any, trials: int) -> list[tuple[str, str, str, str]]:
    """``trials`` SIGKILLs of a calling worker, on one pair of files (as test_crash.py)."""
    rng = random.Random(20_240_601)
    survived = lost = duplicated = misreported = corrupt = held = refused = unexplained = 0
    answered = with_holds = cut = cut_tokens = uncounted = 0
    gap_off = 0  # scopes whose spend != the ledger's sum after reclaiming
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(trials):
            t = worker.kill_trial(Path(tmp), n, rng)
            answered += t.answered
            lost += len(t.lost)
            duplicated += len(t.duplicated)
            misreported += len(t.misreported)
            corrupt += sum(result != "ok" for result in t.integrity.values())
            held += t.held_after
            refused += len(t.reclaim_refused)
            unexplained += len(t.unexplained)
            with_holds += t.held_at_kill > 0
            # One call per user in flight at most: a user scope that reclaiming settled is one call.
            cut += sum(t.settled_on_reclaim[f"user:{user}"] > 0 for user in worker.CRASH_USERS)
            cut_tokens += sum(t.settled_on_reclaim[f"user:{user}"] for user in worker.CRASH_USERS)
            missed = sum(abs(tokens) for tokens in t.uncounted_tokens.values())
            uncounted += missed
            off = sum(gap != 0 for gap in t.spend_minus_ledger.values())
            gap_off += off
            survived += (
                t.returncode == -signal.SIGKILL and not off and not missed
                and not (t.lost or t.duplicated or t.misreported or t.reclaim_refused or t.unexplained
                         or t.bad_lines or t.held_after)
                and all(result == "ok" for result in t.integrity.values())
                and all(len(t.in_flight[f"user:{user}"]) <= 1 for user in worker.CRASH_USERS)
            )
    calls = f"{answered} calls"
    return [
        ("kill trials survived (SIGKILL, then every check)", f"{trials} kills", f"{survived}/{trials}", "all"),
        ("answered calls lost from the ledger", calls, str(lost), "0"),
        ("answered calls with 2+ rows, or a row unlike the Reply", calls, str(duplicated + misreported), "0"),
        ("files failing PRAGMA integrity_check", f"{2 * trials} checks", str(corrupt), "0"),
        ("dead workers' holds not reclaimed (refused reservations)", f"{4 * trials} scopes", str(refused), "0"),
        ("reservations left open after reclaiming (tokens)", f"{4 * trials} scopes", str(held), "0"),
        ("spend moved by more than reported + in-flight calls", f"{4 * trials} scopes", str(unexplained), "0"),
        ("in-flight calls' tokens the spend never counted", f"{4 * trials} scopes", str(uncounted), "0"),
        ("spend != ledger sum after reclaiming (scopes)", f"{4 * trials} scopes", str(gap_off), "0"),
        ("(measured) kills that left a dead worker's holds", f"{trials} kills", str(with_holds), "-"),
        ("(measured) calls cut between row and settle, settled", f"{trials} kills",
         f"{cut} ({cut_tokens} tok)", "-"),
    ]


def fleet_rows(worker: Any, runs: int) -> list[tuple[str, str, str, str]]:
    """``runs`` runs of each test_processes.py scenario: 3 worker processes and this one,
    4 threads each, 40 calls a thread."""
    import tokenguard as tg

    over = unequal = open_holds = missing = scopes = calls = 0
    other_refused = isolated_calls = hog_refusals = 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            threads = worker.shared_threads(4, 4, 40)
            report = worker.run_fleet(workdir, worker.SHARED_BUDGETS, threads, max_output_tokens=32, fail_rate=0.15)
            store = workdir / "budget.sqlite"
            rows = tg.Ledger(workdir / "ledger.sqlite").records()
            calls += report.calls
            ids = {r["request_id"] for r in rows}
            missing += abs(report.calls - len(rows)) + sum(rid not in ids for rid in report.ok)
            checks: list[tuple[tg.Budget, dict[str, Any], list[dict[str, Any]]]] = []
            per_user = tg.Budget(**worker.SHARED_PER_USER, store=store)
            for user in worker.SHARED_USERS:
                checks.append((per_user, {"user": user}, [r for r in rows if r["user"] == user]))
            per_session = tg.Budget(**worker.SHARED_PER_SESSION, store=store)
            for session in {r["session"] for r in rows}:
                checks.append((per_session, {"session": session}, [r for r in rows if r["session"] == session]))
            checks.append((tg.Budget(**worker.SHARED_GLOBAL, store=store), {}, rows))
            for budget, who, mine in checks:
                spent = budget.spent(**who)
                scopes += 1
                over += (spent["tokens"] > budget.tokens) or (budget.usd is not None and spent["usd"] > budget.usd)
                unequal += spent["tokens"] != sum(worker.tokens_of(r) for r in mine)
                open_holds += spent["reserved_tokens"] > 0

        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            threads = worker.isolation_threads(4, hog_threads=3, hog_calls=40, calls=20)
            limit = worker.isolation_limit(threads, 32)
            report = worker.run_fleet(workdir, [{"tokens": limit, "per": "user"}], threads, max_output_tokens=32)
            rows = tg.Ledger(workdir / "ledger.sqlite").records()
            budget = tg.Budget(tokens=limit, per="user", store=workdir / "budget.sqlite")
            calls += report.calls
            missing += abs(report.calls - len(rows))
            isolated_calls += sum(t["calls"] for mine in threads for t in mine if t["user"] != "hog")
            other_refused += sum(user != "hog" or key != "user:hog|" for user, _, key in report.refused)
            hog_refusals += len(report.refused)
            for user in ("hog", "b", "c"):
                spent = budget.spent(user=user)
                scopes += 1
                over += spent["tokens"] > limit
                unequal += spent["tokens"] != sum(worker.tokens_of(r) for r in rows if r["user"] == user)
                open_holds += spent["reserved_tokens"] > 0
    return [
        ("overspend across processes (scopes over a limit)", f"{scopes} scopes", str(over), "0"),
        ("spend != ledger sum across processes (scopes)", f"{scopes} scopes", str(unequal), "0"),
        ("reservations left open after the runs (scopes)", f"{scopes} scopes", str(open_holds), "0"),
        ("calls without exactly one ledger row", f"{calls} calls", str(missing), "0"),
        ("other users refused while hog exhausts theirs", f"{isolated_calls} calls", str(other_refused), "0"),
        ("(measured) hog's refusals", f"{runs} runs", str(hog_refusals), "> 0"),
    ]


def crash_table(kill_trials: int, fleet_runs: int) -> None:
    """The crash-safety and processes table."""
    worker = _worker()
    start = time.perf_counter()
    rows = kill_rows(worker, kill_trials) if kill_trials else []
    rows += fleet_rows(worker, fleet_runs) if fleet_runs else []
    header = f"{'check':<58} {'of':>14} {'result':>16} {'target':>9}"
    print(f"\ncrash safety and processes: {kill_trials} SIGKILLed workers, {fleet_runs} runs of each multi-process "
          f"scenario ({time.perf_counter() - start:.0f} s)")
    print(header)
    print("-" * len(header))
    for check, over, result, target in rows:
        print(f"{check:<58} {over:>14} {result:>16} {target:>9}")
    if kill_trials:
        print("note: the meter step commits a call's ledger row, then the settle step its spend, in another file;\n"
              "a kill between the two leaves a row and an open hold, which reclaiming settles to what the row\n"
              "says (the hold's id names its call; the Guard links its ledger to the SQLite budget store).")


# -- hostile payloads through the entry points, and the runner's leaks -------------------------

ODD = ["\x00", "\u0301", "\u200f", "\u202e", "\ufeff", "\ud800", "\udfff", "\r\n", "\t", " " * 600, "人" * 50,
       "😀", "<|im_start|>", "<|endoftext|>", "[INST]", "0" * 700, "-" * 300, PROSE]


def hostile_payload(rng: random.Random) -> Any:
    """A prompt or message list of the kinds an attacker or a buggy client sends: odd
    text, runs of one character, special-token text, and malformed message structures."""
    text = "".join(rng.choice(ODD) for _ in range(rng.randint(0, 6)))
    shapes: list[Callable[[], Any]] = [
        lambda: text,
        lambda: [{"role": "user", "content": text}],
        lambda: [{"role": rng.choice(["system", "user", "assistant", "tool"]), "content": text}
                 for _ in range(rng.randint(1, 30))],
        lambda: [{"role": "user", "content": [{"type": rng.choice(["text", "image_url", 3]), "text": text}]}],
        lambda: [{"role": "assistant", "content": None, "tool_calls": rng.choice([None, "x", [{"function": text}]])}],
        lambda: rng.choice([None, {}, [None], [{"role": 1}], [], b"bytes", 7, [{"content": text}], {"role": "user"}]),
    ]
    return rng.choice(shapes)()


def fault_rows(fuzz: int, runner: bool) -> list[tuple[str, str, str, str]]:
    import asyncio
    import threading

    from tokenguard.context import Relevant, Retrieval, Summary, TailOnly

    rng = random.Random(0)
    guard = tg.Guard(lambda messages, max_tokens, **params: "ok", model="gpt-4o", max_input_tokens=GUARD_LIMIT,
                     max_context_tokens=3000)
    tokenizer = tg.get_tokenizer("gpt-4o")
    strategies = [TailOnly(), Relevant(), Summary(lambda text: text[-300:], keep_recent_tokens=64),
                  Retrieval(k=4, keep_recent_tokens=64)]
    entry_points: list[Callable[[Any], Any]] = [
        lambda p: guard.complete(p, temperature=0.0),
        lambda p: "".join(guard.stream(p)),
        lambda p: guard.chat(p if isinstance(p, (str, dict)) else str(p)[:200], session="fuzz"),
        lambda p: asyncio.run(guard.acomplete(p)),
        lambda p: tokenizer.count_messages(p),
        *[lambda p, s=strategy: s.fit(p, rng.randint(0, 800), tokenizer) for strategy in strategies],
    ]
    tried = unexpected = 0
    examples: list[str] = []
    for _ in range(fuzz):
        payload = hostile_payload(rng)
        for call in entry_points:
            tried += 1
            try:
                call(payload)
            except tg.TokenGuardError:
                pass
            except Exception as error:  # noqa: BLE001 - counted: the figure that must read 0
                unexpected += 1
                if len(examples) < 3:
                    examples.append(f"{type(error).__name__}: {error}"[:120])
    rows = [("inputs tried through 9 entry points", f"{fuzz} payloads", f"{tried}", "-"),
            ("unexpected exceptions (not a TokenGuardError)", f"{tried} calls", f"{unexpected}", "0")]
    for example in examples:
        print(f"  unexpected: {example}")
    if runner:
        from tokenguard.runner import LlamaRunner

        threads_before = threading.active_count()
        bundled = LlamaRunner(kv_cache_bytes=64 << 20, session_ttl_s=600)
        total = bundled.stats()["kv_blocks_total"]
        for i in range(40):  # sessions opened and abandoned, streams left midway, a prompt over the pool
            bundled.generate(f"Session {i} says hello.", max_tokens=4, session=f"abandoned-{i}")
            with bundled.stream(f"Tell me a long story, number {i}.", max_tokens=200) as stream:
                next(stream, None)
        with contextlib.suppress(tg.TokenGuardError):
            bundled.generate("word " * 20_000, max_tokens=4)
        for i in range(40):
            bundled.end_session(f"abandoned-{i}")
        leaked = total - bundled.stats()["kv_blocks_free"]
        bundled.close()
        deadline = time.monotonic() + 10
        while threading.active_count() > threads_before and time.monotonic() < deadline:
            time.sleep(0.05)
        rows += [("KV blocks leaked (40 abandoned sessions, 40 cancelled streams)", f"{total} blocks",
                  str(leaked), "0"),
                 ("threads left after the runner closed", f"{threads_before} before",
                  f"{threading.active_count() - threads_before}", "0")]
    return rows


def fault_table(fuzz: int, runner: bool) -> None:
    start = time.perf_counter()
    rows = fault_rows(fuzz, runner)
    header = f"{'check':<62} {'of':>16} {'result':>10} {'target':>7}"
    print(f"\nhostile payloads and leaks ({time.perf_counter() - start:.0f} s)")
    print(header)
    print("-" * len(header))
    for check, over, result, target in rows:
        print(f"{check:<62} {over:>16} {result:>10} {target:>7}")


if __name__ == "__main__":
    main()
