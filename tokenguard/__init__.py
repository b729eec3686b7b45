"""tokenguard: metered, bounded and cheap LLM calls.

>>> import tokenguard as tg
>>> tg.count_tokens("人工智能", model="gpt-4o")
2
"""

from tokenguard.errors import InputTooLong, MissingDependency, TokenGuardError, UnknownTokenizer
from tokenguard.tokens import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    count_tokens,
    get_tokenizer,
)

__version__ = "0.1.0"

__all__ = [
    "HFTokenizer",
    "InputTooLong",
    "MissingDependency",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "TokenGuardError",
    "Tokenizer",
    "UnknownTokenizer",
    "count_tokens",
    "get_tokenizer",
]
