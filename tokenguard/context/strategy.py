"""What a context strategy is, and the rules every one keeps."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tokenguard.context.messages import canonical
from tokenguard.tokens import Tokenizer

__all__ = ["ContextStrategy", "Turn", "TurnCosts", "pinned_indices", "turn_indices_from_end", "turns"]

_CACHE_SIZE = 65_536  # per-turn counts remembered, least recently used dropped first

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


def pinned_indices(messages: Sequence[Mapping[str, Any]], newest_first: Iterator[list[int]]) -> list[int]:
    """What every strategy keeps whatever the budget: the system messages, and the
    newest user message with whatever follows it (tool calls and their results, an
    assistant's answer). ``newest_first`` is :func:`turn_indices_from_end` of
    ``messages``; it is read up to that user message, so a strategy goes on from there
    to the older turns."""
    kept = [i for i, message in enumerate(messages) if message.get("role") == "system"]
    for turn in newest_first:
        role = messages[turn[0]].get("role")
        if role != "system":
            kept += turn
            if role == "user":
                break
    return kept


class TurnCosts:
    """What a turn adds to a prompt (its framing included), remembered by content.

    A strategy asks for the same turns call after call (a chat resends its history; a
    nested call forwards its parent's), so each turn is counted once per tokenizer. At
    most ``size`` counts are kept, the least recently used dropped first.
    """

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, tokenizer: Tokenizer, turn: Turn, empty: int) -> int:
        """The tokens ``turn`` adds to a prompt whose empty form costs ``empty``
        (``tokenizer.count_messages([])``)."""
        key = f"{tokenizer.name}:{hashlib.blake2b(canonical(turn), digest_size=16).hexdigest()}"
        with self._lock:
            cost = self._counts.get(key)
            if cost is not None:
                self._counts.move_to_end(key)
                return cost
        cost = max(tokenizer.count_messages(turn) - empty, 0)
        with self._lock:
            self._counts[key] = cost
            while len(self._counts) > self.size:
                self._counts.popitem(last=False)
        return cost

    def __len__(self) -> int:
        """How many counts are remembered."""
        with self._lock:
            return len(self._counts)
