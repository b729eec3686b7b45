"""What a conversation carries from turn to turn: session histories, and the context
strategies that fit a conversation into a model's window: :class:`TailOnly` (the newest
turns), :class:`Summary` (older turns folded into a running summary), :class:`Retrieval`
(the older turns the question recalls) and :class:`Relevant` (the turns most related to
what must be kept, as nested calls need)."""

from tokenguard.context.history import SessionHistory
from tokenguard.context.messages import content_text, fingerprint, message_text
from tokenguard.context.relevant import Relevant
from tokenguard.context.retrieval import Retrieval
from tokenguard.context.strategy import (
    ContextStrategy,
    ConversationStrategy,
    Generate,
    TurnCosts,
    pinned_indices,
    turn_cost,
    turn_indices_from_end,
    turns,
)
from tokenguard.context.summary import Summary
from tokenguard.context.tail_only import TailOnly

__all__ = [
    "ContextStrategy",
    "ConversationStrategy",
    "Generate",
    "Relevant",
    "Retrieval",
    "SessionHistory",
    "Summary",
    "TailOnly",
    "TurnCosts",
    "content_text",
    "fingerprint",
    "message_text",
    "pinned_indices",
    "turn_cost",
    "turn_indices_from_end",
    "turns",
]
