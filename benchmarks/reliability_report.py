"""What a hostile input costs the input cap, per tokenizer family and input class.

    .venv/bin/python benchmarks/reliability_report.py [--quick] [--repeats 5]

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
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}")
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


if __name__ == "__main__":
    main()
