"""Count long runs of one character without tokenizing them (the pumping rule).

A text made of one character repeated is the cheapest way to make a tokenizer work
hard: a vocabulary holds tokens of up to 128 spaces or dashes, so proving that such a
text exceeds a 4,000-token cap means tokenizing half a megabyte of it, and tiktoken's
BPE spends about half a microsecond per byte on one long pre-token. This module takes
the run's length out of the cost.

**The rule.** For a run of one character ``c`` at least ``MARGIN`` long, anywhere in
any text, ``PERIOD`` more copies of ``c`` add the same number of tokens, ``delta(c)``:

    count(x + c * (k + PERIOD) + y) == count(x + c * k + y) + delta(c)   for k >= MARGIN

so a run of ``k >= MIN_RUN`` characters is counted as one of ``MARGIN + (k - MARGIN)
% PERIOD`` characters plus ``(k - MARGIN) // PERIOD * delta(c)`` tokens.

**Why it holds.** Pre-tokenization: the split patterns of every family we ship
(tiktoken's o200k/cl100k, the GPT-2/Llama-3/Qwen-2 patterns of GGUF vocabularies,
SentencePiece's whitespace split) match a run's character class only with unbounded
repetition (``\\s+``, ``\\p{L}+``, ``[^\\s\\p{L}\\p{N}]+``), so the inside of a run is
never a pre-token boundary and a longer run only makes the one pre-token holding it
longer. (Digits are the exception, ``\\p{N}{1,3}``; no vocabulary has a run token of
digits, so digits are never run characters here.) BPE: merges inside a run of one
character settle into blocks of the longest run token (128 spaces in o200k, 64 in
SmolLM2, 16 in Mistral's SentencePiece model), and what the run's ends decide reaches
only a bounded distance into it: at most 128 characters for every run character of
the four shipped vocabularies, in the contexts the check below uses (``MARGIN`` is
twice that). ``PERIOD`` = 256 is a multiple of every block length they use.

**Checked, not assumed.** The rule depends on the vocabulary, so before a character is
compressed for a tokenizer, :meth:`RunCounter.delta` measures ``delta(c)`` and checks
the rule on several run lengths (a period that does not divide ``PERIOD`` shows as a
changing step) and inside the contexts that change pre-tokenization (a letter, a
digit, punctuation, a space, a newline, a CJK character, start and end of text); a
character that fails is never compressed. For the shipped vocabularies,
``tests/stress/test_run_exactness.py`` checks every run character against plain
counting, in many more contexts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable

#: Characters of a run kept on each side of the part that is compressed away.
MARGIN = 256
#: Copies of the character removed at a time; each removal is worth ``delta(c)`` tokens.
PERIOD = 256
#: The shortest run that is compressed.
MIN_RUN = MARGIN + PERIOD

# Probe spacing when looking for runs: every run of MIN_RUN holds two probes.
_PROBE = MIN_RUN // 2

# A character is a run character of a vocabulary when a token holds this many copies
# of it in a row: only such runs pack many characters into one token.
_SEED = 8

# What may stand before and after a run when the rule is checked: start/end of text,
# lower/upper-case letters, a digit, punctuation (also o200k's "/" after newlines), a
# space, a newline, a CJK character, a combining mark.
_LEFT = ("", "a", "A", "1", ".", " ", "\n", "人")
_RIGHT = ("", "a", "A", "1", ".", "/", " ", "\n", "人", "\u0301")


class RunCounter:
    """Counts the long runs of one character in a text in O(1) each (see the module).

    ``count`` is the tokenizer's exact plain count; ``token_texts`` are the texts of its
    tokens, from which the run characters (``chars``) are found, with the ASCII
    characters the tokenizer drops. Everything kept is bounded by the number of run
    characters.
    """

    def __init__(self, count: Callable[[str], int], token_texts: Iterable[str]) -> None:
        self._count = count
        seed = re.compile(rf"(.)\1{{{_SEED - 1},}}", re.DOTALL)
        # ASCII characters the tokenizer drops (no token at all: SmolLM2's 0x04, BERT's
        # controls): a run of them costs a full read to count 0 tokens otherwise.
        chars = {c for c in map(chr, range(128)) if count(c) == 0}
        for text in token_texts:
            if len(text) >= _SEED:
                chars.update(match.group(1) for match in seed.finditer(text))
        #: Characters whose runs this vocabulary packs into long tokens (or drops).
        self.chars = tuple(sorted(chars))
        self._charset = frozenset(chars)
        self._needles = {c: c * MIN_RUN for c in self.chars}
        self._run_ends = {c: re.compile(re.escape(c) + "*") for c in self.chars}
        self._deltas: dict[str, int | None] = {}

    def compress(self, text: str) -> tuple[str, int]:
        """``text`` with every run of at least ``MIN_RUN`` copies of a checked run
        character shortened, and the tokens the removed copies stand for."""
        if len(text) < MIN_RUN:
            return text, 0
        # A run of MIN_RUN characters covers two characters _PROBE apart at positions
        # divisible by _PROBE: only characters seen twice so are looked for.
        probes = text[::_PROBE]
        seen = {a for a, b in itertools.pairwise(probes) if a == b}
        runs: list[tuple[int, int, str]] = []
        for c in self._charset.intersection(seen):
            if c in self._deltas and self._deltas[c] is None:
                continue  # measured: this vocabulary's runs of c do not follow the rule
            needle = self._needles[c]
            start = text.find(needle)
            while start >= 0:
                rest = self._run_ends[c].match(text, start + MIN_RUN)
                end = rest.end() if rest is not None else start + MIN_RUN
                runs.append((start, end, c))
                start = text.find(needle, end)
        if not runs:
            return text, 0
        runs.sort()
        parts: list[str] = []
        extra = 0
        pos = 0
        for start, end, c in runs:
            delta = self.delta(c)
            if delta is None:
                continue
            removed = (end - start - MARGIN) // PERIOD
            parts += (text[pos:start], c * (end - start - removed * PERIOD))
            extra += removed * delta
            pos = end
        if pos == 0:
            return text, 0
        parts.append(text[pos:])
        return "".join(parts), extra

    def delta(self, c: str) -> int | None:
        """Tokens added by ``PERIOD`` more copies of ``c`` inside a long run, or None
        when the rule does not hold for ``c`` in this vocabulary (measured once)."""
        try:
            return self._deltas[c]
        except KeyError:
            pass
        delta = self._measure(c)
        self._deltas[c] = delta
        return delta

    def _measure(self, c: str) -> int | None:
        count = self._count
        delta = count(c * (MARGIN + PERIOD)) - count(c * MARGIN)
        for k in (MARGIN + 1, MARGIN + 2, MARGIN + 3, MARGIN + 5, MARGIN + PERIOD - 1):
            if count(c * (k + PERIOD)) - count(c * k) != delta:
                return None
        short, long = c * (MARGIN + 1), c * (MARGIN + 1 + PERIOD)
        for left in _LEFT:
            for right in _RIGHT:
                if count(left + long + right) - count(left + short + right) != delta:
                    return None
        return delta
