"""The pumping rule of tokenguard/tokens/runs.py against plain counting, for every run
character of every shipped vocabulary.

``count`` shortens each run of at least MIN_RUN copies of a run character and adds
``delta(c)`` tokens per PERIOD copies removed; ``encode`` never does. The two must
agree on any text. The fast tests cover every run character in a sample of contexts
and lengths; the slow one walks every residue of the period in more contexts.
"""

from __future__ import annotations

import itertools

import pytest
from hostile_inputs import FAMILIES, load_family, warm

import tokenguard as tg
from tokenguard.tokens import runs
from tokenguard.tokens.runs import MARGIN, MIN_RUN, PERIOD, RunCounter

CONTEXTS = [
    "", "a", "Hello", "A", "1", "123", ".", "!?", "/", " ", "  ", "\n", "\r\n", "\t", "人工", "😀",
    "\u0301", "'s", "<|endoftext|>", "x\n", "\u3000", "-", "=", " x", "\ud800",
]


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizer(request: pytest.FixtureRequest) -> tg.Tokenizer:
    return warm(load_family(request, request.param))


def test_every_run_character_follows_the_rule(tokenizer: tg.Tokenizer) -> None:
    counter = tokenizer._runs
    assert " " in counter.chars or "-" in counter.chars  # the vocabulary packs some runs
    failing = [c for c in counter.chars if counter.delta(c) is None]
    assert not failing, f"run characters for which the pumping rule was refused: {failing!r}"


def test_compressed_counts_equal_plain_counts(tokenizer: tg.Tokenizer) -> None:
    pairs = list(zip(CONTEXTS, CONTEXTS[3:] + CONTEXTS[:3], strict=True))
    for c in tokenizer._runs.chars:
        for (left, right), k in itertools.product(pairs[::3], (MIN_RUN, MIN_RUN + PERIOD - 1, 4 * MIN_RUN + 3)):
            text = left + c * k + right
            assert tokenizer.count(text) == len(tokenizer.encode(text)), (c, left, k, right)


def test_several_runs_in_one_text(tokenizer: tg.Tokenizer) -> None:
    chars = tokenizer._runs.chars
    text = "".join(f"{CONTEXTS[i % len(CONTEXTS)]}{c * (MIN_RUN + 97 * i)}" for i, c in enumerate(chars)) + "end"
    assert tokenizer.count(text) == len(tokenizer.encode(text))
    assert tokenizer.count_until(text, 10**9) == tokenizer.count(text)


def test_a_vocabulary_without_the_rule_is_never_compressed() -> None:
    # A fake count (quadratic in the length, so no constant step exists): this tests
    # the checker, which must refuse the character and leave the text alone.
    counter = RunCounter(lambda text: len(text) ** 2 // 1000 + 1, ["        "])
    assert counter.chars == (" ",)
    assert counter.delta(" ") is None
    text = "a" + " " * (5 * MIN_RUN) + "b"
    assert counter.compress(text) == (text, 0)


def test_compression_keeps_a_margin_and_removes_whole_periods() -> None:
    counter = RunCounter(len, ["--------"])  # one token per character: delta is PERIOD
    text = "x" + "-" * (MIN_RUN + 3 * PERIOD + 5) + "y"
    short, extra = counter.compress(text)
    assert short == "x" + "-" * (MARGIN + 5) + "y"
    assert extra == 4 * PERIOD
    assert counter.compress("-" * (MIN_RUN - 1)) == ("-" * (MIN_RUN - 1), 0)


@pytest.mark.slow
def test_every_residue_in_every_context(tokenizer: tg.Tokenizer) -> None:
    """Every run length from MIN_RUN - 2 to MIN_RUN + PERIOD + 2 alone, and in 37
    context pairs at 9 residues, for every run character: 5 to 10 seconds per family."""
    pairs = list(itertools.product(CONTEXTS[:8], CONTEXTS[8:11])) + list(itertools.pairwise(CONTEXTS[11:]))
    residues = (0, 1, 2, 3, 5, 64, 127, 128, PERIOD - 1)
    for c in tokenizer._runs.chars:
        for k in range(MIN_RUN - 2, MIN_RUN + PERIOD + 3):
            assert tokenizer.count(c * k) == len(tokenizer.encode(c * k)), (c, k)
        for (left, right), r in itertools.product(pairs, residues):
            text = left + c * (MIN_RUN + PERIOD + r) + right
            assert tokenizer.count(text) == len(tokenizer.encode(text)), (c, left, r, right)
    assert runs.MARGIN >= 128  # the largest reach measured for the shipped vocabularies
