"""Nested calls: how many times its root's input tokens a whole call tree costs, without
scopes (every level forwards everything) and with the default scopes.

    .venv/bin/python benchmarks/bench_scopes.py [--quick] [--notes 48]

Each tree is one ``@guard`` function (a plain Python function behind a real guard,
counted with gpt-4o's tokenizer) writing one in-memory ledger. The root is called on
a history of notes and a task; every call below depth ``depth - 1`` calls ``fan-out``
children with everything it received plus a task of its own, on a topic of the notes.
Amplification is the input tokens of the whole tree (summed over its ledger rows,
linked by ``root_id``) over the root's. Without scopes a tree of ``n`` calls costs
about ``n`` times its root; with them each child takes at most a quarter of its
parent, so a chain stays under 4/3 (target: under 1.5x at every depth). Time is per
tree, the guard's whole pipeline included.
"""

from __future__ import annotations

import argparse
import platform
import time

import tokenguard as tg

TOPICS = ["database migration", "billing invoices", "search ranking", "login tokens", "cache eviction", "deploy"]


def notes(n: int) -> list[dict[str, str]]:
    return [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"Note {i} on the {TOPICS[i % 6]}: we discussed how the {TOPICS[i % 6]} behaves under "
            "load, what broke last week, and which owner follows up with a fix.",
        }
        for i in range(n)
    ]


def task(level: int, branch: int) -> dict[str, str]:
    topic = TOPICS[(level + branch) % len(TOPICS)]
    return {"role": "user", "content": f"Level {level} task {branch}: list what the notes say on the {topic}."}


def run_tree(depth: int, fanout: int, history: list[dict[str, str]], trim: bool) -> tuple[float, int, float]:
    """One tree: (amplification, calls, seconds)."""
    ledger = tg.Ledger()

    @tg.guard(model="gpt-4o", ledger=ledger, **({} if trim else {"scope": None}))
    def level(messages, index, max_tokens):
        if index + 1 < depth:
            for branch in range(fanout):
                level([*messages, task(index + 1, branch)], index + 1)
        return "done"

    start = time.perf_counter()
    reply = tg.reply_of(level([*history, task(0, 0)], 0))
    seconds = time.perf_counter() - start
    rows = ledger.records(root_id=reply.request_id)
    assert len(rows) == len(ledger) and all(row["error"] is None for row in rows)
    return sum(row["input_tokens"] for row in rows) / reply.usage.input_tokens, len(rows), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter history and depths 2-4 only")
    parser.add_argument("--notes", type=int, default=None, help="notes in the root's history (default 48; 24 quick)")
    args = parser.parse_args()
    history = notes(args.notes or (24 if args.quick else 48))
    depths = range(2, 5) if args.quick else range(2, 6)
    root_tokens = tg.count_tokens([*history, task(0, 0)], model="gpt-4o")
    run_tree(2, 1, history, True)  # warm the tokenizer and the counts' caches' code paths

    print(f"call-tree amplification: input tokens of the tree / the root's ({root_tokens}-token root, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()})")
    print(f"  {'depth':>5} {'fan-out':>7} {'calls':>5} | {'no scopes':>9} {'ms':>7} | {'scopes':>7} {'ms':>7}")
    chains_ok = True
    for depth in depths:
        for fanout in range(1, 5):
            without, calls, slow_s = run_tree(depth, fanout, history, trim=False)
            with_, _, fast_s = run_tree(depth, fanout, history, trim=True)
            if fanout == 1:
                chains_ok &= with_ < 1.5
            print(f"  {depth:>5} {fanout:>7} {calls:>5} | {without:8.2f}x {slow_s * 1e3:7.1f} | "
                  f"{with_:6.2f}x {fast_s * 1e3:7.1f}")
    print(f"  chains (fan-out 1) under 1.5x with scopes at every depth: {'ok' if chains_ok else 'NO'}")


if __name__ == "__main__":
    main()
