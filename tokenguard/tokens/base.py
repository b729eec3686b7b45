"""The :class:`Tokenizer` interface every tokenizer family implements.

A family supplies ``encode``/``decode`` of plain text, its special tokens and its
chat-message accounting; the bounded and exact helpers built on them (``count``,
``count_until``, ``truncate``, ``encode_trusted``, ``count_trusted``) live here once.

Hostile text costs what ordinary text costs: long runs of one character are counted
without tokenizing them (:mod:`tokenguard.tokens.runs`), and ``count_until`` stops
reading where the text's length alone proves it is over the limit.
"""

from __future__ import annotations

import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any, Literal, TypeVar

from tokenguard.errors import InvalidRequest, TokenGuardError
from tokenguard.tokens.chat_template import RenderedChat
from tokenguard.tokens.runs import MIN_RUN, RunCounter

_T = TypeVar("_T")

Message = Mapping[str, Any]

# count_until's first window is this many characters per allowed token (and at least
# _MIN_WINDOW); every later window doubles it.
_CHARS_PER_TOKEN_WINDOW = 8
# Characters past a cut that truncate checks for a word whose end fits again.
_WORD_SCAN = 24
# truncate refines its cut by encoding the search's window only while the window holds
# at most this many characters a token (prose holds 4 to 6; a run of spaces hundreds).
_REFINED_CHARS_PER_TOKEN = 32
_MIN_WINDOW = 64
# How far back from a window's end the text beyond it may still change tokenization.
# Merges in every family we ship stop at pre-token boundaries (whitespace, punctuation,
# script changes), and inside a long pre-token they reach only a bounded distance
# from a cut; so the tokens of the window's last _UNSETTLED_CHARS characters, plus
# one, bound what the cut can add.
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
    def count_messages(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Exact prompt size of an OpenAI-style message list, reply priming included,
        with the definitions of ``tools`` (OpenAI's ``tools=`` list) when given."""

    def tool_texts(self, tools: Sequence[Mapping[str, Any]] | None) -> Iterator[str]:
        """The texts of ``tools`` that their count reads (a chat template renders all of
        them): an input cap bounds them without reading more."""
        return strings_in(check_tools(tools))

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        """The tokens the definitions of ``tools`` add to a prompt (0 for none)."""
        if not check_tools(tools):
            return 0
        probe = [{"role": "user", "content": ""}]
        return max(self.count_messages(probe, tools=tools) - self.count_messages(probe), 0)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, control tokens included."""

    @property
    @abstractmethod
    def special_tokens(self) -> Mapping[str, int]:
        """Control tokens by their text, e.g. ``{"<|endoftext|>": 100257}``."""

    # -- what a family may refine -------------------------------------------------------

    def _count_plain(self, text: str) -> int:
        """Exact number of tokens of plain ``text`` (``len(_encode_plain(text))``);
        a family with a cheaper exact count overrides it."""
        return len(self._encode_plain(text))

    def _token_texts(self) -> Iterable[str]:
        """The text each plain token stands for, used to find the characters whose runs
        the vocabulary packs into long tokens. Families list their vocabulary faster."""
        for i in range(self.vocab_size):
            if i not in self._special_ids:
                yield self.decode([i])

    @cached_property
    def _max_token_chars(self) -> int | None:
        """The most characters of input one token can stand for, where the family can
        prove a bound (no normalizer that shrinks text, no token for an unknown run);
        ``None`` where it cannot. ``count_until`` uses it to stop reading."""
        return None

    @cached_property
    def _dropped_chars(self) -> str:
        """Characters the vocabulary has no token for, which the model never sees: they
        are outside :attr:`_max_token_chars`' bound (a byte-level BPE may lack a few)."""
        return ""

    # -- shared behaviour -----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``: no BOS/EOS, special-token text as ordinary text.

        >>> get_tokenizer("gpt-4o").encode("hello world")
        [24912, 2375]
        """
        _check_text(text)
        return self._native(self._encode_plain, text)

    def count(self, text: str) -> int:
        """Exact number of tokens in plain ``text``.

        Runs of at least ``MIN_RUN`` copies of one character are counted by the
        pumping rule of :mod:`tokenguard.tokens.runs` rather than tokenized, so a
        megabyte of spaces costs what a few hundred of them do.
        """
        _check_text(text)
        extra = 0
        if len(text) >= MIN_RUN:
            text, extra = self._runs.compress(text)
        return self._native(self._count_plain, text) + extra

    def count_until(self, text: str, limit: int) -> int:
        """``count(text)`` when it is at most ``limit``; otherwise some number above it.

        The work is bounded by the limit, not by the text: rejecting a 100 MB string
        against a 4,000-token cap tokenizes a few tens of kilobytes. Windows of the
        text's head double until the tokens they settle exceed the limit or the window
        covers the whole text (then the count is exact). Where no token stands for more
        than ``_max_token_chars`` characters, a text longer than that many per allowed
        token is over the limit by its length alone: the doubling stops after the first
        window (which settles most texts by itself), so text that packs many
        characters into each token (a megabyte of spaces) costs no more than prose.
        """
        _check_text(text)
        limit = _check_count(limit, "limit")
        size = max(_MIN_WINDOW, _CHARS_PER_TOKEN_WINDOW * (limit + 1))
        if size < len(text) and not text.isascii():
            # The window's allowance is really in bytes: a token seldom holds less than
            # one byte, and CJK or emoji pack 3-4 into a character. Narrowing the window
            # for such text keeps its first look as cheap as prose's.
            width = len(text[:size].encode("utf-8", "surrogatepass")) / size
            size = max(_MIN_WINDOW, int(size / width))
        bound, dropped = self._max_token_chars, self._dropped_chars
        while size < len(text):
            head = text[:size]
            settled = self.count(head) - self.count(head[-_UNSETTLED_CHARS:]) - 1
            if settled > limit:
                return settled
            # What the bound covers: the text, or (characters the model drops take no
            # token) the head's other characters.
            covered = len(text) if not dropped else len(head) - sum(map(head.count, dropped))
            if bound is not None and covered > bound * (limit + 1):
                return covered // bound  # at least limit + 1 tokens: none holds more than `bound` characters
            size *= 2
        return self.count(text)

    def truncate(self, text: str, max_tokens: int, side: Literal["right", "left"] = "right") -> str:
        """The longest prefix (``side="right"``) or suffix (``side="left"``) of ``text``
        within ``max_tokens`` tokens. Cuts fall between characters, never inside one.
        """
        _check_text(text)
        max_tokens = _check_count(max_tokens, "max_tokens")
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
        window = part(too_long)
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            if self.count(part(middle)) <= max_tokens:
                fits = middle
            else:
                too_long = middle
        # A prefix's count does not grow with its length everywhere ("Hello, Worl" is 4
        # tokens, "Hello, World" 3), so the search may stop short inside a word: the text
        # of the window's first (or last) max_tokens tokens may reach further, and so may
        # the rest of the word the cut is in. Only for a window of text that packs few
        # characters into each token: one of runs (megabytes of spaces) would be encoded
        # in full, where counting it compressed its runs.
        if too_long <= _REFINED_CHARS_PER_TOKEN * (max_tokens + 1):
            ids = self.encode(window)
            kept_ids = ids[:max_tokens] if side == "right" else ids[len(ids) - max_tokens :]
            whole_tokens = self.decode(kept_ids).strip("\ufffd")
            if len(whole_tokens) > fits and self.count(whole_tokens) <= max_tokens and (
                text.startswith(whole_tokens) if side == "right" else text.endswith(whole_tokens)
            ):
                fits = len(whole_tokens)
        word_end = fits  # the rest of a word of ASCII letters and digits, and the blank after it
        while word_end < min(len(text), fits + _WORD_SCAN):
            char = text[word_end] if side == "right" else text[len(text) - word_end - 1]
            if not (char.isascii() and (char.isalnum() or char.isspace())):
                break  # CJK and symbols end a word where they stand: nothing to complete
            word_end += 1
            if char.isspace():
                break
        return part(next((n for n in range(word_end, fits, -1) if self.count(part(n)) <= max_tokens), fits))

    def encode_trusted(self, text: str | RenderedChat) -> list[int]:
        """Token ids of text the SDK itself produced (a rendered chat template), where
        special-token text *is* a control token. Never call this on raw user input:
        a :class:`RenderedChat` keeps its user text hidden until the plain pieces are
        encoded, so only the template's own control tokens are parsed.
        """
        ids: list[int] = []
        for part in self._trusted_parts(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self.encode(part)
        return ids

    def count_trusted(self, text: str | RenderedChat) -> int:
        """``len(encode_trusted(text))``, with the plain pieces counted by :meth:`count`
        (so long runs in user text cost nothing extra)."""
        return sum(1 if isinstance(part, int) else self.count(part) for part in self._trusted_parts(text))

    def _trusted_parts(self, text: str | RenderedChat) -> Iterator[str | int]:
        """The pieces of trusted text in order: plain text (the user's originals put
        back) and the ids of the control tokens between them."""
        rendered = text if isinstance(text, RenderedChat) else RenderedChat(text, [])
        pos = 0
        pattern = self._special_pattern
        for match in pattern.finditer(rendered.text) if pattern is not None else ():
            if match.start() > pos:
                yield rendered.restore(rendered.text[pos : match.start()])
            yield self.special_tokens[match.group()]
            pos = match.end()
        if pos < len(rendered.text):
            yield rendered.restore(rendered.text[pos:])

    @cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        # Longest first, so that "<|im_start|>" wins over a shorter token it contains.
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    @cached_property
    def _runs(self) -> RunCounter:
        # Built on first use of a long text: finding the run characters reads the vocabulary.
        return RunCounter(lambda text: self._native(self._count_plain, text), self._token_texts())

    def _native(self, call: Callable[[str], _T], text: str) -> _T:
        """``call(text)`` on the family's native tokenizer, with lone surrogates counted
        as U+FFFD (as tiktoken does). A text the native tokenizer refuses for another
        reason raises :class:`TokenGuardError` naming the tokenizer."""
        try:
            return call(text)
        except (UnicodeEncodeError, RuntimeError, TypeError) as error:
            # Lone surrogates cannot cross into the native tokenizers; SentencePiece
            # reports them as a RuntimeError, tokenizers as a TypeError.
            cleaned = _replace_surrogates(text)
            if cleaned == text:
                raise TokenGuardError(
                    f"{self.name} could not tokenize the text: {type(error).__name__}: {error}"
                ) from error
            return call(cleaned)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def check_messages(messages: Sequence[Message]) -> Sequence[Message]:
    """``messages`` after checking it is a list of messages (see :func:`check_message`)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequest(f"messages must be a list of dicts, got {type(messages).__name__}")
    return [check_message(i, message) for i, message in enumerate(messages)]


def check_message(index: int, message: object) -> Mapping[str, Any]:
    """``message`` after checking it is an OpenAI-style message: a dict with a non-empty
    string role, and content that is a string or a list of part dicts, or ``None`` in an
    assistant message (its tool calls say what it did). An openai SDK message (what
    ``completion.choices[0].message`` is) is taken as its dict."""
    dump = getattr(message, "model_dump", None)
    if not isinstance(message, Mapping) and callable(dump):
        message = dump(exclude_none=True)
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"message {index} has no 'role' (a non-empty string such as 'user')")
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise InvalidRequest(f"message {index} ({role}) has no content; only an assistant message may omit it")
    elif not isinstance(content, str) and not (
        isinstance(content, list) and all(isinstance(part, Mapping) for part in content)
    ):
        raise InvalidRequest(
            f"message {index} ({role}) has content of type {type(content).__name__}; "
            "content is a string or a list of parts such as {'type': 'text', 'text': ...}"
        )
    return message


def strings_in(value: Any) -> Iterator[str]:
    """Every string in ``value`` (dicts' values, lists, tuples), at any depth."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            pending += item.values()
        elif isinstance(item, (list, tuple)):
            pending += item


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as a list, after checking each is a token id of the vocabulary (families
    otherwise fail each their own way, or decode nothing without a word)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidRequest(f"ids must be a list of token ids, got {type(ids).__name__}")
    listed = list(ids)
    for i in listed:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise InvalidRequest(f"{i!r} is no token id of this vocabulary (0 to {vocab_size - 1})")
    return listed


def check_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """``tools`` after checking it is OpenAI's list of function tools (``None``: none)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidRequest(f"tools must be a list of dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be a dict with a 'function' dict that has a 'name'")
    return list(tools)


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"expected text as str, got {type(text).__name__}")


def _check_count(value: object, name: str) -> int:
    """``value`` as a token count: an integer >= 0 (a bool is not one)."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]  # checked at run time
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None:
        raise InvalidRequest(f"{name} must be an integer >= 0, got {value!r}")
    if number < 0:
        raise InvalidRequest(f"{name} must be >= 0, got {number}")
    return number


def _replace_surrogates(text: str) -> str:
    # What tiktoken does: a lone surrogate becomes U+FFFD, valid pairs are kept.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
