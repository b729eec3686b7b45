"""What a conversation carries from turn to turn: session histories, and the context
strategies that fit a conversation into a model's window (:class:`TailOnly` first;
:class:`Relevant` keeps the turns most related to what must be kept, as nested calls do)."""

from tokenguard.context.history import SessionHistory
from tokenguard.context.messages import content_text, fingerprint, message_text
from tokenguard.context.relevant import Relevant
from tokenguard.context.strategy import ContextStrategy, TurnCosts, pinned_indices, turn_indices_from_end, turns
from tokenguard.context.tail_only import TailOnly

__all__ = [
    "ContextStrategy",
    "Relevant",
    "SessionHistory",
    "TailOnly",
    "TurnCosts",
    "content_text",
    "fingerprint",
    "message_text",
    "pinned_indices",
    "turn_indices_from_end",
    "turns",
]
