"""Resolve a model name, encoding name or file path to its :class:`Tokenizer`."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenguard.errors import InvalidRequest, UnknownTokenizer
from tokenguard.tokens.base import Message, Tokenizer
from tokenguard.tokens.bundled import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME, default_model_path
from tokenguard.tokens.openai import OFFLINE_ENCODINGS, TiktokenTokenizer, encoding_for_model, get_encoding

_ACCEPTED = (
    "an OpenAI model name (gpt-4o, gpt-4.1, o1, gpt-4, gpt-3.5-turbo, ...), "
    f"an encoding name ({', '.join(OFFLINE_ENCODINGS)}), "
    f"the bundled model name ({DEFAULT_MODEL_NAME!r}), "
    "or a path to a SentencePiece .model, a Hugging Face tokenizer.json (or its folder), or a .gguf file"
)

_lock = threading.Lock()
_cache: dict[str, Tokenizer] = {}
_names: set[str] = set()  # keys that name a tokenizer (no file): looked up as they are


def get_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """The tokenizer for a model name, an encoding name, or a tokenizer/model file.

    Tokenizers are built once per name (a file: per file, as it is now) and shared; all
    of them work offline.

    >>> get_tokenizer("gpt-4o").count("人工智能")
    2
    """
    key = str(name_or_path)
    with _lock:
        tokenizer = _cache.get(key) if key in _names else None
    if tokenizer is not None:
        return tokenizer
    if key in DEFAULT_MODEL_ALIASES:
        key = DEFAULT_MODEL_NAME
    named = key in (DEFAULT_MODEL_NAME, *OFFLINE_ENCODINGS) or encoding_for_model(key) is not None or not _exists(key)
    if not named:
        key = _file_key(key)
    with _lock:
        tokenizer = _cache.get(key)
    if tokenizer is None:
        tokenizer = _load(key.split("\0", 1)[0])
        with _lock:
            tokenizer = _cache.setdefault(key, tokenizer)
            if named:
                _names.add(str(name_or_path))
                _cache.setdefault(str(name_or_path), tokenizer)
    return tokenizer


def count_tokens(
    text_or_messages: str | Sequence[Message],
    model: str = "gpt-4o",
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Exact token count of a string, or the prompt size of an OpenAI-style message list
    (with the definitions of ``tools``, when given).

    >>> count_tokens("人工智能", model="gpt-4o")
    2
    """
    tokenizer = get_tokenizer(model)
    if isinstance(text_or_messages, str):
        if tools is not None:
            raise InvalidRequest("tools are counted with a message list, not with plain text")
        return tokenizer.count(text_or_messages)
    return tokenizer.count_messages(text_or_messages, tools=tools)


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, an unknown ~user, a name too long for the OS
        return False


def _file_key(path: str) -> str:
    """A file's key: its absolute path, and its size and time (a file replaced at the
    path, or the same relative path from another folder, is another tokenizer)."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}"


def _load(key: str) -> Tokenizer:
    if key in OFFLINE_ENCODINGS:
        return TiktokenTokenizer(get_encoding(key))
    if key == DEFAULT_MODEL_NAME:
        tokenizer = _load_file(default_model_path())
        tokenizer.name = DEFAULT_MODEL_NAME
        return tokenizer
    encoding = encoding_for_model(key)
    if encoding is not None:
        if encoding not in OFFLINE_ENCODINGS:
            raise UnknownTokenizer(
                f"{key!r} uses the tiktoken encoding {encoding!r}, which tokenguard does not ship offline "
                f"(it ships {', '.join(OFFLINE_ENCODINGS)})"
            )
        return TiktokenTokenizer(get_encoding(encoding), model=key)
    if _exists(key):
        return _load_file(Path(key).expanduser())
    raise UnknownTokenizer(f"unknown tokenizer {key!r}; expected {_ACCEPTED}")


def _load_file(path: Path) -> Tokenizer:
    from tokenguard.tokens.gguf_vocab import read_gguf_tokenizer
    from tokenguard.tokens.hf import HFTokenizer
    from tokenguard.tokens.sentencepiece_model import SentencePieceTokenizer

    if path.is_dir() or path.name.endswith(".json"):
        return HFTokenizer.from_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return read_gguf_tokenizer(path)
    if path.suffix == ".gguf":
        raise UnknownTokenizer(f"{path} has a .gguf name but no GGUF header")
    return SentencePieceTokenizer(path)
