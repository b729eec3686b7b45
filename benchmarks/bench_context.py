"""Tail-only context fitting against LangChain's ``trim_messages`` on a long history.

    .venv/bin/python benchmarks/bench_context.py [--turns 10000]

Both keep the newest messages that fit a token budget, counted with the same
tokenizer (gpt-4o's, OpenAI's message accounting). Prints time per fit (after a first
fit, as a chat calls it turn after turn), whether each result is within budget, and how
many messages each kept (target: at least 50x faster, as many messages or more, within
budget). ``langchain-core`` is a benchmark-only peer: ``make bench`` installs it.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import tokenguard as tg
from tokenguard.context import TailOnly


def history(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a terse assistant."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: what is {i} times {i + 1}? 人工智能 🚀"})
        messages.append({"role": "assistant", "content": f"{i * (i + 1)}, as {i} x {i + 1} says."})
    messages.append({"role": "user", "content": "And the last one?"})
    return messages


def per_fit_ms(fit: Callable[[], object], repeats: int) -> float:
    fit()  # the first fit of a session: later turns find their counts remembered
    start = time.perf_counter()
    for _ in range(repeats):
        fit()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = tg.get_tokenizer("gpt-4o")
    messages = history(args.turns)
    print(f"tail-only fit of a {len(messages)}-message history ({platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()})")
    try:
        from langchain_core.messages import convert_to_messages, trim_messages
    except ImportError:
        trim_messages = None
        print("  langchain-core is not installed (make bench installs it): tokenguard only")
    else:
        lc_messages = convert_to_messages(messages)

        def lc_count(msgs: list) -> int:
            """The same accounting as tokenguard's, on LangChain's message objects."""
            roles = {"human": "user", "ai": "assistant", "system": "system"}
            return tokenizer.count_messages([{"role": roles[m.type], "content": m.content} for m in msgs])

        def lc_fit(budget: int) -> list:
            return trim_messages(lc_messages, max_tokens=budget, token_counter=lc_count, strategy="last",
                                 include_system=True, start_on="human")

    for budget in (512, 1024, 2048):
        strategy = TailOnly()
        ours = strategy.fit(messages, budget, tokenizer)
        ours_ms = per_fit_ms(lambda s=strategy, b=budget: s.fit(messages, b, tokenizer), args.repeats)
        line = (f"  budget {budget:>4}: TailOnly {ours_ms:8.2f} ms, {len(ours):3d} messages, "
                f"{tokenizer.count_messages(ours)} tokens")
        if trim_messages is not None:
            theirs = lc_fit(budget)
            theirs_ms = per_fit_ms(lambda b=budget: lc_fit(b), args.repeats)
            line += (f" | trim_messages {theirs_ms:8.2f} ms, {len(theirs):3d} messages, {lc_count(theirs)} tokens"
                     f" | {theirs_ms / ours_ms:6.0f}x faster")
        print(line)


if __name__ == "__main__":
    main()
