"""Shared pieces of the hostile-input tests: the tokenizer families, hostile text, and
a probe that counts the characters handed to a family's native encoder (the work
that costs time), so bounded work is asserted without wall-clock thresholds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tokenguard as tg

FAMILIES = ["o200k", "cl100k", "smollm2", "sentencepiece"]

# A chat template for the SentencePiece model (a bare .model file has none).
SP_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

# One unit repeated: each class a tokenizer may pack into few tokens, or choke on.
RUN_UNITS = {
    "spaces": " ",
    "newlines": "\n",
    "tabs": "\t",
    "crlf": "\r\n",
    "blank-tab": " \t",
    "blank-newline": " \n",
    "ideographic-space": "\u3000",
    "digits": "7",
    "dashes": "-",
    "equals": "=",
    "bang": "!",
    "cjk": "人",
    "emoji": "😀",
    "letter": "a",
    "nul": "\x00",
    "dropped-control": "\x04",  # SmolLM2 has no token for it: 0 tokens, however many
    "combining": "\u0301",
    "rtl-mark": "\u200f",
    "bom": "\ufeff",
    "lone-surrogate": "\ud800",
    "replacement": "\ufffd",
    "special-text": "<|endoftext|>",
}

LOOKALIKES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "<|endofprompt|>", "<unk>"]


def load_family(request: pytest.FixtureRequest, family: str) -> tg.Tokenizer:
    """The tokenizer of one family, as the tests in tests/tokens load it."""
    if family == "o200k":
        return tg.get_tokenizer("gpt-4o")
    if family == "cl100k":
        return tg.get_tokenizer("gpt-4")
    if family == "smollm2":
        return tg.get_tokenizer(request.getfixturevalue("default_gguf"))
    path: Path = request.getfixturevalue("sentencepiece_model")
    return tg.SentencePieceTokenizer(path, chat_template=SP_TEMPLATE)


def warm(tokenizer: tg.Tokenizer) -> tg.Tokenizer:
    """Measure every run character once, so that later reads are the call's own work."""
    for c in tokenizer._runs.chars:
        tokenizer._runs.delta(c)
    return tokenizer


@contextmanager
def encoder_reads(tokenizer: tg.Tokenizer) -> Iterator[list[int]]:
    """``reads[0]``: characters handed to the family's native encoder inside the block.

    Every family counts and encodes through ``_encode_plain``; the probe wraps it on
    the instance and removes itself afterwards."""
    reads = [0]
    native = tokenizer._encode_plain

    def probe(text: str) -> list[int]:
        reads[0] += len(text)
        return native(text)

    tokenizer._encode_plain = probe  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        del tokenizer._encode_plain
