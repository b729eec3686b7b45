"""Exact-cache hit latency: tokenguard's ``ExactCache`` against LangChain's ``SQLiteCache``.

    .venv/bin/python benchmarks/bench_cache.py [--quick] [--entries 100000] [--lookups 5000]

Both caches live on disk in a temporary directory and hold the same number of distinct
chat requests (a system prompt and a user question, 60-80 words, answered at
``temperature=0``). Timed, one lookup at a time with ``perf_counter_ns``, on seeded
random stored requests after a warm-up:

* ``ExactCache.lookup(call)`` on a prepared :class:`~tokenguard.pipeline.Call` (key
  hashing, the diskcache read, parsing the entry, building the zero-cost reply);
* ``Guard.complete(...)`` answered from that cache, end to end (admit, scope, fit,
  counting the prompt, the lookup, a row in an in-memory ledger);
* ``SQLiteCache.lookup(prompt, llm_string)``, with the prompt already serialised the
  way a LangChain chat model keys it (``dumps(messages)``; that serialisation is
  printed apart, as it is paid per call too).

Prints p50 and p99 in microseconds, each p50 against SQLiteCache's, the p50 of an
ExactCache miss, and how long each cache took to fill and its size on disk. Target
(the issue's): an exact hit under 150 µs p50. ``--quick`` uses 10,000 entries.
``langchain-community`` (SQLiteCache) is a benchmark-only peer: ``make bench``
installs it; without it the SQLiteCache row is skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenguard import Guard, Ledger, Reply
from tokenguard.accounting.usage import Usage
from tokenguard.cache import ExactCache

MODEL = "gpt-4o-mini"
TARGET_P50_US = 150.0
SYSTEM = (
    "You are the support assistant of Northwind Books, an online bookshop. Answer in two or three short "
    "sentences, quote the order number when the customer gives one, and never promise a refund or a delivery "
    "date that the shop's policy does not allow."
)
PRODUCTS = ["a hardback atlas", "two paperback novels", "a boxed set of poetry", "a cookbook", "a signed first edition",
            "a children's picture book", "a travel guide to Portugal", "an e-reader cover"]
PROBLEMS = ["it has not arrived yet", "the parcel came damaged", "I was charged twice", "the wrong title was delivered",
            "the tracking page shows nothing", "I want to change the delivery address"]
ASKS = ["What can you do about it?", "How long will this take to sort out?", "Can I get a replacement?",
        "Should I send it back first?", "Who do I need to contact?"]
ANSWER = (
    "Thank you for writing, and sorry for the trouble with order #{order}. I have opened a ticket with our "
    "warehouse team, who will check the parcel and reply by email within two working days with a replacement "
    "or a refund, as our policy allows."
)
# What a LangChain chat model (ChatOpenAI) puts beside the prompt in its cache key.
LLM_STRING = (
    '{"lc": 1, "type": "constructor", "id": ["langchain", "chat_models", "openai", "ChatOpenAI"], "kwargs": '
    '{"model_name": "gpt-4o-mini", "temperature": 0.0, "max_tokens": 512, "openai_api_key": {"lc": 1, "type": '
    '"secret", "id": ["OPENAI_API_KEY"]}}, "name": "ChatOpenAI"}---[(\'_type\', \'openai-chat\'), (\'stop\', None)]'
)


def messages(i: int) -> list[dict[str, str]]:
    """The ``i``-th distinct request: the same system prompt, its own question."""
    pick = random.Random(i)
    question = (f"Hi, I ordered {pick.choice(PRODUCTS)} (order #{100_000 + i}) {pick.randint(2, 20)} days ago and "
                f"{pick.choice(PROBLEMS)}. {pick.choice(ASKS)}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def backend(messages, *, max_tokens, **params):
    raise AssertionError("every timed call is a cache hit: the backend never runs")


def timed(fn: Callable[[Any], object], items: Sequence[Any], warmup: int) -> tuple[float, float, list[object]]:
    """(p50, p99) in microseconds of ``fn(item)`` over ``items``, after ``warmup`` untimed
    calls on the first items, and what each timed call returned."""
    for item in items[:warmup]:
        fn(item)
    clock = time.perf_counter_ns
    times, results = [], []
    for item in items:
        start = clock()
        result = fn(item)
        times.append(clock() - start)
        results.append(result)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49] / 1e3, cuts[98] / 1e3, results


def disk_mb(path: Path) -> str:
    """Megabytes under ``path``: the database files, then SQLite's write-ahead log and its
    index (kept while a connection is open; checkpointed into the database on close)."""
    sizes = {True: 0, False: 0}
    for f in path.rglob("*"):
        if f.is_file():
            sizes[f.name.endswith(("-wal", "-shm"))] += f.stat().st_size
    wal = f" + {sizes[True] / 1e6:.1f} MB write-ahead log" if sizes[True] else ""
    return f"{sizes[False] / 1e6:.1f} MB{wal} on disk"


def fill_exact(cache: ExactCache, guard: Guard, entries: int) -> float:
    """Store one answer per request through the public API, one write each; seconds."""
    start = time.perf_counter()
    for i in range(entries):
        call = guard.prepare(messages(i), temperature=0)
        reply = Reply(ANSWER.format(order=100_000 + i), "stop", call.messages,
                      Usage(input_tokens=78, output_tokens=52, cost_usd=4.3e-5))
        cache.store(call, reply)
    return time.perf_counter() - start


def langchain_peer() -> tuple[Any, ...] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # langchain-community announces its sunset on import
            from langchain_community.cache import SQLiteCache
        from langchain_core.load import dumps
        from langchain_core.messages import convert_to_messages
        from langchain_core.outputs import Generation
        from sqlalchemy import insert
    except ImportError:
        return None
    return SQLiteCache, dumps, convert_to_messages, Generation, insert


def bench_sqlite(peer: tuple[Any, ...], path: Path, entries: int, sample: list[int], lookups: int,
                 warmup: int) -> dict[str, Any]:
    """Fill a SQLiteCache with the same requests and time its hits."""
    sqlite_cache_cls, dumps, convert_to_messages, generation_cls, insert = peer

    def prompt(i: int) -> str:
        return dumps(convert_to_messages(messages(i)))  # what BaseChatModel keys its cache with

    path.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lc = sqlite_cache_cls(str(path / "langchain.db"))
    # update() is one transaction per entry (milliseconds each): time it on the first
    # entries, then insert the same rows it writes in bulk.
    by_update = min(entries, 1000)
    start = time.perf_counter()
    for i in range(by_update):
        lc.update(prompt(i), LLM_STRING, [generation_cls(text=ANSWER.format(order=100_000 + i))])
    update_s = time.perf_counter() - start
    table = lc.cache_schema.__table__
    for chunk in range(by_update, entries, 10_000):
        rows = [{"prompt": prompt(i), "llm": LLM_STRING, "idx": 0,
                 "response": dumps(generation_cls(text=ANSWER.format(order=100_000 + i)))}
                for i in range(chunk, min(chunk + 10_000, entries))]
        with lc.engine.begin() as conn:
            conn.execute(insert(table), rows)
    fill_s = time.perf_counter() - start
    prompts = [prompt(i) for i in sample]
    p50, p99, results = timed(lambda p: lc.lookup(p, LLM_STRING), prompts, warmup)
    if not all(results) or results[0][0].text != ANSWER.format(order=100_000 + sample[0]):
        raise SystemExit("SQLiteCache missed a stored prompt: the benchmark is broken")
    serialise_p50, _, _ = timed(prompt, sample[: min(lookups, 2000)], warmup)
    size = disk_mb(path)
    lc.engine.dispose()
    return {"p50": p50, "p99": p99, "fill_s": fill_s, "update_us": update_s / by_update * 1e6,
            "by_update": by_update, "mb": size, "serialise_p50": serialise_p50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 entries and 2,000 lookups")
    parser.add_argument("--entries", type=int, default=None, help="entries in each cache (default 100,000)")
    parser.add_argument("--lookups", type=int, default=None, help="timed hits per row (default 5,000)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    entries = args.entries or (10_000 if args.quick else 100_000)
    lookups = max(args.lookups or (2_000 if args.quick else 5_000), 100)
    warmup = min(500, lookups)
    rng = random.Random(args.seed)
    sample = [rng.randrange(entries) for _ in range(lookups)]
    peer = langchain_peer()

    print(f"exact-cache hit latency, {entries:,} entries on disk, {lookups:,} random hits per row "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = ExactCache(root / "exact")
        guard = Guard(backend, model=MODEL, cache=cache, ledger=Ledger())
        guard.prepare(messages(0), temperature=0)  # load the tokenizer outside the fill
        fill_s = fill_exact(cache, guard, entries)
        exact_mb = disk_mb(cache.path)
        if len(cache) != entries:
            raise SystemExit(f"ExactCache holds {len(cache)} entries, not {entries}: the benchmark is broken")

        calls = [guard.prepare(messages(i), temperature=0) for i in sample]
        lookup_p50, lookup_p99, hits = timed(cache.lookup, calls, warmup)
        if not all(isinstance(hit, Reply) and hit.cached for hit in hits):
            raise SystemExit("ExactCache.lookup missed a stored request: the benchmark is broken")
        prompts = [messages(i) for i in sample]
        complete_p50, complete_p99, replies = timed(lambda m: guard.complete(m, temperature=0), prompts, warmup)
        if not all(isinstance(r, Reply) and r.cached for r in replies):
            raise SystemExit("Guard.complete missed the cache: the benchmark is broken")
        misses = [guard.prepare(messages(entries + i), temperature=0) for i in range(min(lookups, 2000))]
        miss_p50, miss_p99, missed = timed(cache.lookup, misses, warmup)
        if any(missed):
            raise SystemExit("a never-stored request hit the cache: the benchmark is broken")
        cache.close()

        theirs = bench_sqlite(peer, root / "langchain", entries, sample, lookups, warmup) if peer else None

    def vs(p50: float) -> str:
        return f"{p50 / theirs['p50']:7.2f}x" if theirs else f"{'-':>8}"

    print(f"  {'':30s} {'entries':>9} {'p50 µs':>9} {'p99 µs':>9} {'p50 vs SQLiteCache':>19}")
    print(f"  {'ExactCache.lookup':30s} {entries:>9,} {lookup_p50:9.1f} {lookup_p99:9.1f} {vs(lookup_p50):>19}")
    print(f"  {'Guard.complete (cache hit)':30s} {entries:>9,} {complete_p50:9.1f} {complete_p99:9.1f} "
          f"{vs(complete_p50):>19}")
    if theirs:
        print(f"  {'LangChain SQLiteCache.lookup':30s} {entries:>9,} {theirs['p50']:9.1f} {theirs['p99']:9.1f} "
              f"{vs(theirs['p50']):>19}")
    else:
        print("  LangChain SQLiteCache: langchain-community is not installed (make bench installs it): skipped")
    print(f"  ExactCache.lookup miss (never-stored request): p50 {miss_p50:.1f} µs, p99 {miss_p99:.1f} µs")
    if theirs:
        print(f"  (LangChain serialises the messages to its key before each lookup: dumps(messages) "
              f"p50 {theirs['serialise_p50']:.1f} µs, not in its row)")
    print(f"  fill: ExactCache {fill_s:6.1f} s ({fill_s / entries * 1e6:.0f} µs per store(), one write each), "
          f"{exact_mb}")
    if theirs:
        print(f"        SQLiteCache {theirs['fill_s']:6.1f} s (update() {theirs['update_us']:.0f} µs each on the first "
              f"{theirs['by_update']:,}, the rest inserted in bulk), {theirs['mb']}")
    verdict = "ok" if lookup_p50 < TARGET_P50_US else "OVER TARGET"
    print(f"  target: exact hit under {TARGET_P50_US:.0f} µs p50: ExactCache.lookup {lookup_p50:.1f} µs ({verdict}); "
          f"the whole guarded call {complete_p50:.1f} µs")


if __name__ == "__main__":
    main()
