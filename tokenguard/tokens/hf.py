"""Tokenizers backed by Hugging Face ``tokenizers``: a ``tokenizer.json`` file or folder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFBackend

from tokenguard.errors import UnknownTokenizer
from tokenguard.tokens.base import check_ids
from tokenguard.tokens.templated import TemplatedTokenizer


class HFTokenizer(TemplatedTokenizer):
    """A ``tokenizers.Tokenizer`` with its chat template, BOS and EOS.

    Plain text is encoded without post-processing (no ``[CLS]``/``<s>``) and with
    ``encode_special_tokens`` on, so special-token text in it is ordinary text.
    """

    def __init__(
        self,
        backend: HFBackend,
        *,
        name: str,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        end_of_turn_tokens: Iterable[str] = (),
    ) -> None:
        self.backend = backend
        self.backend.encode_special_tokens = True
        self.backend.no_padding()  # a count must see every token: no pad, no cut
        self.backend.no_truncation()
        self.name = name
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._special = {
            token.content: i for i, token in backend.get_added_tokens_decoder().items() if token.special
        }
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self._extra_eos_ids = frozenset(
            i for i in (backend.token_to_id(t) for t in end_of_turn_tokens) if i is not None
        )

    def _encode_plain(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def _token_texts(self) -> Iterable[str]:
        ids = [[i] for i in range(self.backend.get_vocab_size(with_added_tokens=False))]
        return self.backend.decode_batch(ids, skip_special_tokens=True)

    def _count_plain(self, text: str) -> int:
        dropped = self._dropped_runs
        if dropped is not None:  # a run of dropped characters counts as one: no token either way
            text = dropped.sub(_first_char, text)
        return len(self._encode_plain(text))

    @cached_property
    def _byte_level_bpe(self) -> tuple[dict[str, Any], list[int]] | None:
        """A byte-level BPE without a normalizer (GPT-2, Llama 3, SmolLM, Qwen...): its
        tokenizer.json, and the bytes UTF-8 text can hold that have no token of their own
        (SmolLM2 has none for 0x04, 0x06, ...). ``None`` for other pipelines."""
        spec = json.loads(self.backend.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        if spec.get("normalizer") is not None or model.get("type") != "BPE":
            return None
        if not any(step.get("type") == "ByteLevel" for step in steps):
            return None
        vocab = model.get("vocab") or {}
        return spec, [byte for byte in _UTF8_BYTES if _BYTE_CHARS[byte] not in vocab]

    @cached_property
    def _dropped_chars(self) -> str:
        """The ASCII characters whose byte has no token: the model never sees them."""
        found = self._byte_level_bpe
        return "".join(chr(byte) for byte in found[1] if byte < 0x80) if found is not None else ""

    @cached_property
    def _dropped_runs(self) -> re.Pattern[str] | None:
        return re.compile(f"[{re.escape(self._dropped_chars)}]{{2,}}") if self._dropped_chars else None

    @cached_property
    def _max_token_chars(self) -> int | None:
        """The longest token, in bytes, of a byte-level BPE without a normalizer: every
        byte of the text lands in a token that is a vocabulary entry or an added token,
        and a character is at least one byte, but for the dropped ASCII characters
        (which ``count_until`` sets aside). A vocabulary that lacks a continuation byte
        could drop a whole character of any script, and other pipelines can shrink text
        (a normalizer) or fold an unknown run into one token: no bound."""
        found = self._byte_level_bpe
        if found is None or any(0x80 <= byte < 0xC0 for byte in found[1]):
            return None
        spec = found[0]
        added = [len(token["content"]) for token in spec.get("added_tokens") or ()]
        return max([len(token) for token in spec["model"]["vocab"]] + added)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._special

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path, *, chat_template: str | None = None) -> HFTokenizer:
        """Load ``tokenizer.json`` (or a folder holding it) with the ``tokenizer_config.json``
        beside it, which names BOS/EOS and the chat template.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UnknownTokenizer(f"no tokenizer.json at {path}")
        try:
            backend = HFBackend.from_file(str(file))
        except Exception as e:
            raise UnknownTokenizer(f"{file} is not a Hugging Face tokenizer.json: {e}") from e
        config = _read_json(file.parent / "tokenizer_config.json")
        template = chat_template or config.get("chat_template") or _read_text(file.parent / "chat_template.jinja")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise UnknownTokenizer(f"{file.parent}: the chat template is not text: {type(template).__name__}")
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        generation_eos = _read_json(file.parent / "generation_config.json").get("eos_token_id")
        extra_eos = [backend.id_to_token(i) for i in _as_list(generation_eos)]
        return cls(
            backend,
            name=str(file.parent.name if file.name == "tokenizer.json" else file.name),
            chat_template=template,
            bos_token=bos,
            eos_token=eos,
            add_bos=bool(config.get("add_bos_token", False)),
            end_of_turn_tokens=[t for t in extra_eos if t],
        )


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a
    byte-level vocabulary (printable Latin-1 bytes stand for themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


_BYTE_CHARS = _byte_chars()
# Bytes that UTF-8 text can hold (never 0xC0, 0xC1 or 0xF5-0xFF).
_UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]


def _first_char(match: re.Match[str]) -> str:
    return match.group()[0]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # not UTF-8, not JSON
        raise UnknownTokenizer(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(config, dict):
        raise UnknownTokenizer(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def _read_text(path: Path) -> str | None:
    """A file's text (transformers now saves the chat template as ``chat_template.jinja``)."""
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, ValueError) as e:
        raise UnknownTokenizer(f"{path} is not a readable text file: {e}") from e


def _token_content(token: Any) -> str | None:
    """A config's token entry: either the string or ``{"content": ...}``."""
    if isinstance(token, Mapping):
        token = token.get("content")
    if token is not None and not isinstance(token, str):
        raise UnknownTokenizer(f"a tokenizer_config.json token must be text or {{'content': text}}, got {token!r}")
    return token


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
