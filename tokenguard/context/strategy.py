"""What a context strategy is, and the rules every one keeps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tokenguard.tokens import Tokenizer

__all__ = ["ContextStrategy", "Turn", "turn_indices_from_end", "turns"]

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


def turn_indices_from_end(messages: Sequence[Mapping[str, Any]]) -> Iterator[list[int]]:
    """The turns of ``messages`` as lists of indices, newest first, read lazily from
    the end (a strategy that keeps the newest turns reads no further than it keeps).

    Tool results join the assistant message right before them that called tools; a
    tool result with no such call (its call was dropped from the history) belongs to
    no turn, so it is never sent alone.
    """
    results: list[int] = []
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.get("role") == "tool":
            results.append(i)
            continue
        if results and message.get("tool_calls"):
            yield [i, *reversed(results)]
        else:
            yield [i]
        results = []


def turns(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """``messages`` cut into turns, in order (see :func:`turn_indices_from_end`)."""
    return [[dict(messages[i]) for i in turn] for turn in reversed(list(turn_indices_from_end(messages)))]
