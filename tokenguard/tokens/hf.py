"""Tokenizers backed by Hugging Face ``tokenizers``: a ``tokenizer.json`` file or folder."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFBackend

from tokenguard.errors import UnknownTokenizer
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
        return self.backend.decode(list(ids), skip_special_tokens=False)

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
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: Any) -> str | None:
    """A config's token entry: either the string or ``{"content": ...}``."""
    if isinstance(token, Mapping):
        return token.get("content")
    return token


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
