"""The :class:`Tokenizer` interface every tokenizer family implements.

A family supplies ``encode``/``decode`` of plain text, its special tokens and its
chat-message accounting; the bounded and exact helpers built on them (``count``,
``count_until``, ``truncate``, ``encode_trusted``) live here once.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal

from tokenguard.errors import InvalidRequest, TokenGuardError
from tokenguard.tokens.chat_template import RenderedChat

Message = Mapping[str, Any]

# count_until's first window is this many characters per allowed token (and at least
# _MIN_WINDOW); every later window doubles it.
_CHARS_PER_TOKEN_WINDOW = 8
_MIN_WINDOW = 64
# How far back from a window's end the text beyond it may still change tokenization.
# Merges in every family we ship stop at pre-token boundaries (whitespace, punctuation,
# script changes); a cut can disturb only the pre-token it falls in, so the tokens of
# the window's last _UNSETTLED_CHARS characters, plus one, bound what the cut can add.
_UNSETTLED_CHARS = 64


class Tokenizer(ABC):
    """Exact token counting for one model family.

    Plain-text methods (``encode``, ``count``, ``count_until``, ``truncate``) never add
    BOS/EOS and treat text that looks like a special token (``<|endoftext|>``, ``<s>``)
    as ordinary text: user input cannot inject a control token. A lone surrogate such
    as ``"\\ud800"`` is counted as U+FFFD, as tiktoken itself does.
    """

    #: A short name for the tokenizer: the encoding, model or file it came from.
    name: str

    # -- what a family provides ---------------------------------------------------

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token text treated as plain text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; an incomplete UTF-8 sequence decodes to U+FFFD."""

    @abstractmethod
    def count_messages(self, messages: Sequence[Message]) -> int:
        """Exact prompt size of an OpenAI-style message list, reply priming included."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, control tokens included."""

    @property
    @abstractmethod
    def special_tokens(self) -> Mapping[str, int]:
        """Control tokens by their text, e.g. ``{"<|endoftext|>": 100257}``."""

    # -- shared behaviour -----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``: no BOS/EOS, special-token text as ordinary text.

        >>> get_tokenizer("gpt-4o").encode("hello world")
        [24912, 2375]
        """
        _check_text(text)
        try:
            return self._encode_plain(text)
        except (UnicodeEncodeError, RuntimeError, TypeError):
            # Lone surrogates cannot cross into the native tokenizers; SentencePiece
            # reports them as a RuntimeError, tokenizers as a TypeError. Anything else
            # is re-raised.
            cleaned = _replace_surrogates(text)
            if cleaned == text:
                raise
            return self._encode_plain(cleaned)

    def count(self, text: str) -> int:
        """Exact number of tokens in plain ``text``."""
        return len(self.encode(text))

    def count_until(self, text: str, limit: int) -> int:
        """``count(text)`` when it is at most ``limit``; otherwise some number above it.

        The work is bounded by the limit, not by the text: rejecting a 100 MB string
        against a 4,000-token cap tokenizes a few tens of kilobytes. Windows of the
        text's head double until the tokens they settle exceed the limit or the window
        covers the whole text (then the count is exact).
        """
        _check_text(text)
        if limit < 0:
            raise InvalidRequest(f"limit must be >= 0, got {limit}")
        size = max(_MIN_WINDOW, _CHARS_PER_TOKEN_WINDOW * (limit + 1))
        while size < len(text):
            head = text[:size]
            settled = self.count(head) - self.count(head[-_UNSETTLED_CHARS:]) - 1
            if settled > limit:
                return settled
            size *= 2
        return self.count(text)

    def truncate(self, text: str, max_tokens: int, side: Literal["right", "left"] = "right") -> str:
        """The longest prefix (``side="right"``) or suffix (``side="left"``) of ``text``
        within ``max_tokens`` tokens. Cuts fall between characters, never inside one.
        """
        _check_text(text)
        if max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {max_tokens}")
        if side not in ("right", "left"):
            raise InvalidRequest(f'side must be "right" or "left", got {side!r}')

        def part(n: int) -> str:
            return text[:n] if side == "right" else text[len(text) - n :]

        if self.count_until(text, max_tokens) <= max_tokens:
            return text
        # Grow a window until it no longer fits, then binary-search its length.
        fits, too_long = 0, max(_MIN_WINDOW, max_tokens)
        while too_long < len(text) and self.count(part(too_long)) <= max_tokens:
            fits, too_long = too_long, too_long * 2
        too_long = min(too_long, len(text))
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            if self.count(part(middle)) <= max_tokens:
                fits = middle
            else:
                too_long = middle
        return part(fits)

    def encode_trusted(self, text: str | RenderedChat) -> list[int]:
        """Token ids of text the SDK itself produced (a rendered chat template), where
        special-token text *is* a control token. Never call this on raw user input:
        a :class:`RenderedChat` keeps its user text hidden until the plain pieces are
        encoded, so only the template's own control tokens are parsed.
        """
        rendered = text if isinstance(text, RenderedChat) else RenderedChat(text, [])
        ids: list[int] = []
        pos = 0
        pattern = self._special_pattern
        for match in pattern.finditer(rendered.text) if pattern is not None else ():
            if match.start() > pos:
                ids += self.encode(rendered.restore(rendered.text[pos : match.start()]))
            ids.append(self.special_tokens[match.group()])
            pos = match.end()
        if pos < len(rendered.text):
            ids += self.encode(rendered.restore(rendered.text[pos:]))
        return ids

    @cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        # Longest first, so that "<|im_start|>" wins over a shorter token it contains.
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def check_messages(messages: Sequence[Message]) -> Sequence[Message]:
    """``messages`` after checking it is a list of dicts with a role each."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequest(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise TokenGuardError(f"message {i} has no 'role'")
    return messages


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"expected text as str, got {type(text).__name__}")


def _replace_surrogates(text: str) -> str:
    # What tiktoken does: a lone surrogate becomes U+FFFD, valid pairs are kept.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
