"""Token metering speed against raw tiktoken, and the bounded cap against a full count.

    .venv/bin/python benchmarks/bench_tokens.py [--huge-mb 100]

Prints (1) count_tokens against tiktoken's encode_ordinary on ~1 MB of mixed
English/Chinese text (target: within 5%), and (2) count_until(limit=4000) against a
full count on a huge string (target: at least 1,000x faster).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import tokenguard as tg
from tokenguard.tokens.openai import get_encoding

PARAGRAPH = (
    "Large language models read tokens, not characters; a bill is a count of tokens. "
    "大型语言模型按令牌计费，而不是按字符。精确计数可以避免意外的账单。 "
    "def handler(request):\n    return model.generate(request.prompt, max_tokens=256)\n\n"
)


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--huge-mb", type=int, default=100, help="size of the hostile input in MB (default 100)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}")
    encoding = get_encoding("o200k_base")
    tg.count_tokens("warm up", model="gpt-4o")

    text = PARAGRAPH * (1_000_000 // len(PARAGRAPH.encode()))
    raw = best_of(args.repeats, lambda: len(encoding.encode_ordinary(text)))
    ours = best_of(args.repeats, lambda: tg.count_tokens(text, model="gpt-4o"))
    assert tg.count_tokens(text, model="gpt-4o") == len(encoding.encode_ordinary(text))
    mb = len(text.encode()) / 1e6
    print(f"\n1) count {mb:.2f} MB mixed English/Chinese, o200k_base (best of {args.repeats})")
    print(f"   raw tiktoken encode_ordinary : {raw * 1e3:8.1f} ms  ({mb / raw:.1f} MB/s)")
    print(f"   tokenguard count_tokens      : {ours * 1e3:8.1f} ms  ({mb / ours:.1f} MB/s)")
    print(f"   overhead                     : {(ours / raw - 1) * 100:+.1f}%  (target within 5%)")

    huge = PARAGRAPH * (args.huge_mb * 1_000_000 // len(PARAGRAPH.encode()))
    tokenizer = tg.get_tokenizer("gpt-4o")
    capped = best_of(args.repeats, lambda: tokenizer.count_until(huge, 4000))
    start = time.perf_counter()
    full = tokenizer.count(huge)
    full_time = time.perf_counter() - start
    print(f"\n2) cap a {len(huge.encode()) / 1e6:.0f} MB string at 4,000 tokens ({full:,} tokens in all)")
    print(f"   full count                   : {full_time * 1e3:10.1f} ms")
    print(f"   count_until(text, 4000)      : {capped * 1e3:10.3f} ms  -> {tokenizer.count_until(huge, 4000)} (> 4000)")
    print(f"   speed-up                     : {full_time / capped:10,.0f}x  (target at least 1,000x)")


if __name__ == "__main__":
    main()
