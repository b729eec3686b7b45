"""Exact, offline token counting for every tokenizer family (tiktoken, SentencePiece,
Hugging Face ``tokenizer.json``, GGUF vocabularies)."""

from tokenguard.tokens.base import Message, Tokenizer, check_message
from tokenguard.tokens.bundled import DEFAULT_MODEL_NAME, default_model_path
from tokenguard.tokens.chat_template import ChatTemplateError
from tokenguard.tokens.hf import HFTokenizer
from tokenguard.tokens.openai import TiktokenTokenizer
from tokenguard.tokens.registry import count_tokens, get_tokenizer
from tokenguard.tokens.sentencepiece_model import SentencePieceTokenizer
from tokenguard.tokens.templated import TemplatedTokenizer

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ChatTemplateError",
    "HFTokenizer",
    "Message",
    "SentencePieceTokenizer",
    "TemplatedTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "check_message",
    "count_tokens",
    "default_model_path",
    "get_tokenizer",
]
