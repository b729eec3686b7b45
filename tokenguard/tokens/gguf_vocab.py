"""The tokenizer embedded in a GGUF file, rebuilt as a Hugging Face ``tokenizers`` BPE.

Two kinds are rebuilt; others raise :class:`UnknownTokenizer` naming what the file holds.

* Byte-level BPE (``tokenizer.ggml.model == "gpt2"``: Llama 3, Qwen, SmolLM, StarCoder):
  GGUF stores the vocabulary, merges, token types and a pre-tokenizer name
  (``tokenizer.ggml.pre``); llama.cpp maps that name to split patterns, and so do we.
* SentencePiece BPE (``"llama"``: Llama 2, Mistral, ...): GGUF stores pieces and scores.
  A merge's rank is the score of the piece it makes, as in SentencePiece itself; unknown
  bytes fall back to ``<0xNN>`` pieces, and spaces become ``▁`` with one in front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from tokenguard.errors import UnknownTokenizer
from tokenguard.tokens.hf import HFTokenizer

_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3 = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2 = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_DIGIT = r"\p{N}"

# tokenizer.ggml.pre -> split patterns applied in order, as in llama.cpp's vocab loader.
PRE_TOKENIZER_PATTERNS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "smollm": (_DIGIT, _GPT2),
    "starcoder": (_DIGIT, _GPT2),
    "refact": (_DIGIT, _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}

# Control tokens that end a turn in the common chat formats (llama.cpp treats these as
# end-of-generation too).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def read_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer of the GGUF file at ``path``, with its chat template, BOS and EOS."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UnknownTokenizer(f"{path} is not a readable GGUF file: {e}") from e
    meta = {key: _field_value(field) for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    return tokenizer_from_gguf_metadata(meta, name=path.name)


def tokenizer_from_gguf_metadata(meta: dict[str, Any], *, name: str) -> HFTokenizer:
    """Build the tokenizer from GGUF ``tokenizer.*`` metadata values."""
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        backend = _byte_level_bpe(meta, tokens, name)
    elif model == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise UnknownTokenizer(
            f"{name}: GGUF tokenizer model {model!r} is not supported; tokenguard rebuilds "
            "byte-level BPE ('gpt2') and SentencePiece BPE ('llama') vocabularies"
        )
    backend.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED
    ])
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False) if k == _CONTROL]
    )

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    controls = {t for t, k in zip(tokens, types, strict=False) if k == _CONTROL}
    end_of_turn = [token("tokenizer.ggml.eot_token_id"), *(t for t in _END_OF_TURN if t in controls)]
    return HFTokenizer(
        backend,
        name=name,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        end_of_turn_tokens=[t for t in end_of_turn if t],
    )


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], name: str) -> HFBackend:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise UnknownTokenizer(
            f"{name}: GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZER_PATTERNS)}"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFBackend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_PATTERNS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> HFBackend:
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, str, str]] = []
    for i, piece in enumerate(tokens):
        if types[i] != _NORMAL:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked += [(-scores[i], i, left, right) for left, right in splits]
    ranked.sort(key=lambda r: (r[0], r[1]))  # best score first, then vocabulary order
    unknown = next((t for t, k in zip(tokens, types, strict=False) if k == _UNKNOWN), None)
    backend = HFBackend(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                                   unk_token=unknown, fuse_unk=True, byte_fallback=True))
    normalize: list[Any] = [normalizers.Replace(" ", "▁")]
    decode: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # SentencePiece's dummy prefix
        normalize.insert(0, normalizers.Prepend("▁"))
        decode.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = normalizers.Sequence(normalize)
    backend.decoder = decoders.Sequence(decode)
    return backend


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a field type this gguf version cannot decode: not a tokenizer key we use
        return None
