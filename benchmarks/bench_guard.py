"""Per-call overhead of Guard around a trivial Function backend, against calling the
function directly: in memory (in-memory ledger, in-process budget) and with a SQLite
ledger and SQLite budget. Tokenisation is timed separately and subtracted, so the
numbers are the guard's own work (pipeline, pricing, ledger row, reservation).

    python benchmarks/bench_guard.py [--calls 5000] [--model gpt-4o]

Targets: under 100 µs in memory, under 1 ms with SQLite.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tokenguard import Budget, Guard
from tokenguard.tokens import get_tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
REPLY = "Paris."


def backend(messages, *, max_tokens):
    return REPLY


def per_call_us(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` runs of the mean time of one call, in microseconds."""
    for _ in range(min(calls, 200)):  # warm caches and the tokenizer
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--model", default="gpt-4o", help="names the tokenizer and the price")
    args = parser.parse_args()

    tok = get_tokenizer(args.model)
    direct = per_call_us(lambda: backend(MESSAGES, max_tokens=512), args.calls)
    # What the guard tokenises per call: the prompt once, the reply once.
    tokenise = per_call_us(lambda: (tok.count_messages(MESSAGES), tok.count(REPLY)), args.calls)

    with tempfile.TemporaryDirectory() as tmp:
        memory = Guard(backend, model=args.model, budget=Budget(tokens=10**15, usd=10**6))
        sqlite = Guard(
            backend,
            model=args.model,
            ledger=Path(tmp) / "ledger.sqlite",
            budget=Budget(tokens=10**15, usd=10**6, store=Path(tmp) / "budget.sqlite"),
        )
        rows = [
            ("in memory (ledger + budget)", memory, 100.0),
            ("SQLite ledger + SQLite budget", sqlite, 1000.0),
        ]
        print(f"tokenguard Guard overhead per call ({platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}, model {args.model}, {args.calls} calls x 5)")
        print(f"  direct call:         {direct:8.2f} µs")
        print(f"  tokenisation:        {tokenise:8.2f} µs  (prompt + reply, subtracted below)")
        for name, guard, target in rows:
            total = per_call_us(lambda g=guard: g.complete(MESSAGES, user="bench"), args.calls)
            overhead = total - direct - tokenise
            verdict = "ok" if overhead < target else "OVER TARGET"
            print(f"  {name:30s} {overhead:8.1f} µs overhead  (total {total:7.1f} µs; "
                  f"target < {target:.0f} µs: {verdict})")
        assert len(memory.ledger) > args.calls  # every call left its row


if __name__ == "__main__":
    main()
