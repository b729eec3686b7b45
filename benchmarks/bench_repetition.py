"""Repetition stopping: false stops on natural text, how soon loops stop, what the
detector costs per token, and what it saves on the bundled model's own loops.

    .venv/bin/python benchmarks/bench_repetition.py [--record] [--quick]

Prints (1) false stops on the natural corpus (target 0) and, apart, on the standard
library's test fixtures, which repeat data on purpose; (2) the miss rate and the
tokens from a loop's start to its stop on the looping corpus (target: every loop
within 120 tokens); (3) the detector's time per token-sized piece against the bundled
runner's decode time per token (target under 1%); (4) output tokens, time and saved
tokens on prompts that make the bundled model loop, with ``RepetitionStop`` against
``max_tokens`` alone (what a user has otherwise).

``--record`` regenerates ``tests/data/repetition/looping/smollm2_greedy.json``: the
bundled model's greedy outputs on the looping prompts, with where each loop starts.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import tokenguard as tg
from tokenguard.backends import BundledRunner
from tokenguard.runner import LlamaRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import repetition_corpus as corpus  # the corpus the tests use

LOOPING_PROMPTS = [
    "Write a short poem about saving money.",
    "List tips for saving money.",
    "Describe a cat.",
    "Write a limerick about a GPU.",
    "Give me a list of ten fruits.",
    "Write a song chorus about the ocean.",
    "Write a JSON array of three users.",
]
MAX_TOKENS = 320
PIECE_CHARS = 4  # about one token of English per streamed piece


def loop_start(text: str, max_period: int = 2000) -> int | None:
    """Where a looping text's loop begins (the first character that repeats what came
    before), judged after the fact with the whole text: the earliest point from which
    the rest is periodic, exactly or line by line with list numbers set aside, with at
    least two repeats of the pattern. ``None`` when the text does not loop."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n = len(codes)
    best: int | None = None
    for period in range(1, min(max_period, n // 3) + 1):
        differs = np.flatnonzero(codes[period:] != codes[:-period])
        start = period + (int(differs[-1]) + 1 if differs.size else 0)
        if n - start >= 2 * period and (best is None or start < best):
            best = start
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # the line the length limit cut
    keys = [corpus_key(line) for line in lines]
    offsets = np.cumsum([0] + [len(line) for line in lines])
    for period in range(1, len(keys) // 3 + 1):
        start = len(keys)
        while start - period >= 0 and start - 1 >= period and keys[start - 1] == keys[start - 1 - period]:
            start -= 1
        if len(keys) - start >= 2 * period and keys and keys[-1]:
            candidate = int(offsets[start])
            if best is None or candidate < best:
                best = candidate
    return best


def corpus_key(line: str) -> str:
    """A line with its list marker set aside, for loops that number their repeats."""
    return re.sub(r"^\s*(?:\d{1,4}[.)]|[-*+•])\s+", "", line).strip()


def record() -> None:
    runner = LlamaRunner()
    items = []
    for prompt in LOOPING_PROMPTS:
        result = runner.chat([{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0.0)
        start = loop_start(result.text)
        print(f"{result.finish_reason:>6} {len(result.token_ids):4d} tokens, loop from char {start}: {prompt!r}")
        if start is not None:
            items.append({"prompt": prompt, "text": result.text, "loop_start": start})
    runner.close()
    path = corpus.DATA / "looping" / "smollm2_greedy.json"
    path.write_text(json.dumps(items, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(items)} looping outputs to {path}")


def false_stops(samples: list[corpus.Sample]) -> list[str]:
    return [s.name for s in samples if corpus.first_stop(s.text, 16) is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="record the bundled model's loops first")
    parser.add_argument("--quick", action="store_true", help="a sample of the real texts, no model runs")
    args = parser.parse_args()
    if args.record:
        record()
    limit = 40 if args.quick else None
    print(f"repetition stopping ({platform.processor() or platform.machine()}, Python {platform.python_version()})")

    natural = corpus.natural(real_limit=limit)
    start = time.perf_counter()
    wrong = false_stops(natural)
    chars = sum(len(s.text) for s in natural)
    print(f"  natural corpus: {len(natural)} texts, {chars / 1e6:.1f} M chars: "
          f"{len(wrong)} false stops ({len(wrong) / len(natural):.2%}; target 0) "
          f"[{time.perf_counter() - start:.0f} s]")
    for name in wrong:
        print(f"    false stop: {name}")
    fixtures = corpus.stdlib_modules(fixtures=True, limit=limit)
    fixture_stops = false_stops(fixtures)
    print(f"  stdlib test fixtures and codec tables (repetitive on purpose, not in the target): "
          f"{len(fixture_stops)} of {len(fixtures)} stopped")

    tokenizer = tg.get_tokenizer("SmolLM2-135M-Instruct")
    looping = corpus.looping()
    to_stop = []
    missed = []
    for sample in looping:
        stopped_at = corpus.first_stop(sample.text, PIECE_CHARS)
        assert sample.loop_start is not None
        if stopped_at is None:
            missed.append(sample.name)
            continue
        to_stop.append(tokenizer.count(sample.text[sample.loop_start : max(stopped_at, sample.loop_start)]))
    print(f"  looping corpus: {len(looping)} texts, {len(missed)} missed ({len(missed) / len(looping):.0%}); "
          f"tokens from loop start to stop: median {statistics.median(to_stop):.0f}, max {max(to_stop)} "
          f"(target: all <= 120: {'ok' if max(to_stop) <= 120 and not missed else 'NO'})")
    for name in missed:
        print(f"    missed: {name}")

    # Cost per token: token-sized pieces of natural text, against the runner's decode.
    text = "".join(s.text for s in natural[:200])[:400_000]
    pieces = list(corpus.pieces(text, PIECE_CHARS))
    watch = tg.RepetitionStop().watch()
    start = time.perf_counter()
    for piece in pieces:
        watch.feed(piece)
    per_piece_us = (time.perf_counter() - start) / len(pieces) * 1e6
    if args.quick:
        print(f"  detector: {per_piece_us:.1f} us per {PIECE_CHARS}-char piece")
        return
    runner = LlamaRunner()
    runner.generate("Once upon a time", max_tokens=8)  # warm up
    start = time.perf_counter()
    result = runner.generate("Once upon a time", max_tokens=64, temperature=0.0, stop=[])
    decode_us = (time.perf_counter() - start) / max(len(result.token_ids), 1) * 1e6
    print(f"  detector: {per_piece_us:.1f} us per {PIECE_CHARS}-char piece; bundled runner decode "
          f"{decode_us:.0f} us per token ({runner.precision.name}): {per_piece_us / decode_us:.2%} (target < 1%)")

    backend = BundledRunner(runner)
    for label, stop in (("max_tokens only", None), ("RepetitionStop", tg.RepetitionStop())):
        guard = tg.Guard(backend, max_output_tokens=MAX_TOKENS, stop=stop)
        start = time.perf_counter()
        replies = [guard.complete(prompt, temperature=0.0) for prompt in LOOPING_PROMPTS]
        seconds = time.perf_counter() - start
        out = sum(r.usage.output_tokens for r in replies)
        saved = sum(r.usage.saved_tokens for r in replies)
        reasons = ", ".join(sorted({r.stop_reason for r in replies}))
        print(f"  {len(LOOPING_PROMPTS)} looping prompts, {label:>15}: {out:5d} output tokens, {seconds:5.1f} s, "
              f"saved {saved} tokens ({reasons})")
    runner.close()


if __name__ == "__main__":
    main()
