"""What a conversation carries from turn to turn: session histories, and the context
strategies that fit a conversation into a model's window (:class:`TailOnly` first)."""

from tokenguard.context.history import SessionHistory
from tokenguard.context.strategy import ContextStrategy, turn_indices_from_end, turns
from tokenguard.context.tail_only import TailOnly

__all__ = ["ContextStrategy", "SessionHistory", "TailOnly", "turn_indices_from_end", "turns"]
