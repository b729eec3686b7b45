"""How many prompt tokens a trimming step spared: what the scope and fit steps record
so that reports can show the savings of context fitting and scope trimming."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from tokenguard.context import turn_cost
from tokenguard.context.messages import turn_key
from tokenguard.context.strategy import CountMemo
from tokenguard.tokens import Tokenizer

__all__ = ["SparedTokens"]

_SIZE = 65_536  # message costs remembered, least recently used dropped first


def _key(tokenizer: Tokenizer, message: Mapping[str, Any]) -> Hashable:
    """What a message's cost is filed under. A plain text message by its role and its
    text's hash and length: a ``str`` keeps its hash once computed, so a history resent
    call after call costs a dict lookup per message. Anything else (tool calls, parts)
    by a hash of every field."""
    content = message.get("content")
    if isinstance(content, str) and len(message) == 2:
        return tokenizer.name, message.get("role"), hash(content), len(content)
    return tokenizer.name, turn_key([message])


class SparedTokens:
    """``spared(tokenizer, before, after)``: the tokens the messages ``before`` a step
    would have taken in the prompt, less those the messages ``after`` it take: what
    trimming (or folding into a summary) spared, never below 0.

    Each message is priced once by :func:`~tokenguard.context.turn_cost` (its chat
    template framing included) and remembered, so measuring costs a lookup per message,
    not a recount of the history. A sum of per-message costs can differ from a whole
    prompt's count by a few framing tokens on some templates: the figure is what a
    report shows as saved, never what is billed or budgeted.
    """

    def __init__(self, size: int = _SIZE) -> None:
        self._costs = CountMemo(size)

    def __call__(
        self, tokenizer: Tokenizer, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
    ) -> int:
        return max(self._size(tokenizer, before) - self._size(tokenizer, after), 0)

    def _size(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> int:
        keys = [_key(tokenizer, message) for message in messages]
        costs = self._costs.lookup(keys)
        missing = {key: message for key, message, cost in zip(keys, messages, costs, strict=True) if cost is None}
        if not missing:
            return sum(costs)  # type: ignore[arg-type]
        priced = {key: turn_cost(tokenizer, [dict(message)]) for key, message in missing.items()}
        self._costs.remember(priced)
        return sum(cost if cost is not None else priced[key] for key, cost in zip(keys, costs, strict=True))
