"""tokenguard: metered, bounded and cheap LLM calls.

>>> import tokenguard as tg
>>> tg.count_tokens("人工智能", model="gpt-4o")
2
"""

import logging as _logging

from tokenguard import accounting, backends, cache, context, pipeline, stores, tokens
from tokenguard._decorator import Guarded, guard, reply_of
from tokenguard._guard import Guard
from tokenguard._repetition import RepetitionStop
from tokenguard.accounting import Budget, Ledger, Price, Reply, UnknownPriceWarning, Usage
from tokenguard.errors import (
    BackendError,
    BackendTimeout,
    BudgetExceeded,
    ConfigError,
    InputTooLong,
    InvalidRequest,
    MissingDependency,
    StoreError,
    TokenGuardError,
    UnknownTokenizer,
)
from tokenguard.pipeline.tree import scope
from tokenguard.tokens import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    count_tokens,
    get_tokenizer,
)

__version__ = "0.1.0"

# A library logs, the application decides where to: nothing is printed unless it asks
# (logging.basicConfig(level=logging.INFO) shows the bundled model loading).
_logging.getLogger("tokenguard").addHandler(_logging.NullHandler())

__all__ = [
    "BackendError",
    "BackendTimeout",
    "Budget",
    "BudgetExceeded",
    "ConfigError",
    "Guard",
    "Guarded",
    "HFTokenizer",
    "InputTooLong",
    "InvalidRequest",
    "Ledger",
    "MissingDependency",
    "Price",
    "RepetitionStop",
    "Reply",
    "SentencePieceTokenizer",
    "StoreError",
    "TiktokenTokenizer",
    "TokenGuardError",
    "Tokenizer",
    "UnknownPriceWarning",
    "UnknownTokenizer",
    "Usage",
    "accounting",
    "backends",
    "cache",
    "context",
    "count_tokens",
    "errors",
    "get_tokenizer",
    "guard",
    "pipeline",
    "reply_of",
    "scope",
    "stores",
    "tokens",
]
