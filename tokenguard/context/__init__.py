"""What a conversation carries from turn to turn: session histories (context strategies
that fit them into a model's window join here)."""

from tokenguard.context.history import SessionHistory

__all__ = ["SessionHistory"]
