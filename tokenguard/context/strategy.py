"""What a context strategy is, and the rules every one keeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tokenguard.tokens import Tokenizer

__all__ = ["ContextStrategy", "Turn", "turns"]

Turn = list[dict[str, Any]]
"""Messages that stay or go together: one message, or an assistant message that calls
tools with the tool results that answer it."""


@runtime_checkable
class ContextStrategy(Protocol):
    """Builds the messages to send from a conversation, within ``max_tokens``.

    Every strategy guarantees: the result's exact count (chat template included, with
    ``tokenizer``) is at most ``max_tokens``; system messages are kept; the newest user
    message is kept whole, or :class:`~tokenguard.InputTooLong` is raised; an assistant
    message with tool calls and its tool results stay or go together; order is kept;
    ``messages`` is not changed.
    """

    def fit(self, messages: Sequence[Mapping[str, Any]], max_tokens: int, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        ...


def turns(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """``messages`` cut into turns: a tool result joins the assistant message that
    called it (by ``tool_call_id``, or the nearest open call when it names none), so
    that no result is ever sent without its call."""
    result: list[Turn] = []
    open_calls: dict[str, Turn] = {}
    for message in messages:
        copy = dict(message)
        if copy.get("role") == "tool" and result:
            owner = open_calls.get(str(copy.get("tool_call_id"))) or (
                result[-1] if result[-1][0].get("tool_calls") else None
            )
            if owner is not None:
                owner.append(copy)
                continue
        turn = [copy]
        result.append(turn)
        for call in copy.get("tool_calls") or ():
            if isinstance(call, Mapping) and call.get("id") is not None:
                open_calls[str(call["id"])] = turn
    return result
