"""Incremental detokenization and stop strings for streaming.

Text is released only once it is final: never half of a UTF-8 character (the
tokenizer decodes an incomplete byte sequence as U+FFFD, which we wait out; a reply
cut inside a character ends before it), and never text that a stop string might
still claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
_CONTEXT_TOKENS = 4  # prompt tokens decoded ahead of the reply, for leading-space rules


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that join to the reply's text.

    Decodes a short window (the last emitted tokens plus the new ones) each step and
    emits what it added; tokenizers whose decode depends on the previous token (a
    SentencePiece word-start space) see their context.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, without the bytes of a character the reply was cut
        inside (they decode as U+FFFD: sent on, they would be a character nobody wrote)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if final:
            new_text = new_text.rstrip(REPLACEMENT_CHAR)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]


class StopStrings:
    """Finds the first stop string in growing text and says how much text is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int) -> int:
        """Index of the earliest stop string in ``text`` that ends after ``start``, or -1."""
        if not self.stops:
            return -1
        begin = max(0, start - self.longest + 1)
        hits = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
        return min(hits, default=-1)

    def safe_length(self, text: str) -> int:
        """Length of the prefix of ``text`` no stop string can still reach into."""
        for size in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - size
        return len(text)
