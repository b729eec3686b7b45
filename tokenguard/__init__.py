"""tokenguard: metered, bounded and cheap LLM calls.

>>> import tokenguard as tg
>>> tg.count_tokens("人工智能", model="gpt-4o")
2
"""

from tokenguard.budget import Budget
from tokenguard.errors import BudgetExceeded, InputTooLong, MissingDependency, TokenGuardError, UnknownTokenizer
from tokenguard.guard import Guard
from tokenguard.ledger import Ledger
from tokenguard.pricing import Price, UnknownPriceWarning
from tokenguard.tokens import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    count_tokens,
    get_tokenizer,
)
from tokenguard.usage import Reply, Usage

# Last: the decorator `guard` shares its name with the module tokenguard.guard, and the
# package attribute must be the decorator.
from tokenguard.decorator import guard  # noqa: E402  isort: skip

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetExceeded",
    "Guard",
    "HFTokenizer",
    "InputTooLong",
    "Ledger",
    "MissingDependency",
    "Price",
    "Reply",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "TokenGuardError",
    "Tokenizer",
    "UnknownPriceWarning",
    "UnknownTokenizer",
    "Usage",
    "count_tokens",
    "get_tokenizer",
    "guard",
]
