"""Tokenizers from a SentencePiece ``.model`` file (Llama 2, Mistral, Gemma, T5...)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece

from tokenguard.errors import UnknownTokenizer
from tokenguard.tokens.base import check_ids
from tokenguard.tokens.templated import TemplatedTokenizer


class SentencePieceTokenizer(TemplatedTokenizer):
    """A SentencePiece model. Control pieces (``<s>``, ``[INST]``) are never produced
    from text by SentencePiece itself, so plain text cannot inject them.

    A bare ``.model`` file carries no chat template: pass ``chat_template=`` (Jinja,
    as in ``tokenizer_config.json``) to count messages.
    """

    def __init__(self, path: str | Path, *, chat_template: str | None = None, add_bos: bool = True) -> None:
        path = Path(path)
        self.name = path.name
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise UnknownTokenizer(f"{path} is not a SentencePiece model: {e}") from e
        self.chat_template = chat_template
        self.add_bos = add_bos
        sp = self.processor
        self._special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_token_id = sp.eos_id() if sp.eos_id() >= 0 else None

    def _encode_plain(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode(check_ids(ids, self.vocab_size))

    def _token_texts(self) -> Iterable[str]:
        sp = self.processor
        return (sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size()) if not sp.is_control(i))

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._special

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()
