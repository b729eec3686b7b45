"""``TailOnly``: the newest turns that fit, and nothing older."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenguard.context.messages import is_instruction
from tokenguard.context.strategy import TurnCosts, no_user_note, pinned_indices, turn_indices_from_end
from tokenguard.errors import InputTooLong
from tokenguard.tokens import Tokenizer

__all__ = ["TailOnly"]


class TailOnly:
    """Keep the system messages and the newest turns that fit in ``max_tokens``.

    A fit costs in proportion to what it keeps, not to the history: each turn's count
    is remembered (keyed by its content), turns are taken newest first until the next
    would not fit, and the chosen prompt is then counted once exactly, chat template
    included; when the template makes it longer than the sum, older turns go until it
    fits.

    >>> from tokenguard import get_tokenizer
    >>> history = [{"role": "user", "content": f"question {i}"} for i in range(1000)]
    >>> len(TailOnly().fit(history, 50, get_tokenizer("gpt-4o")))
    6
    """

    def __init__(self) -> None:
        self._costs = TurnCosts()

    def fit(self, messages: Sequence[Mapping[str, Any]], max_tokens: int, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        return [dict(messages[i]) for i in self.select(messages, max_tokens, tokenizer)]

    def select(self, messages: Sequence[Mapping[str, Any]], max_tokens: int, tokenizer: Tokenizer) -> list[int]:
        """The indices of the messages :meth:`fit` keeps, in order: the system messages
        and a run of the newest turns (strategies that add older context start here)."""

        def chosen(indices: list[int]) -> list[dict[str, Any]]:
            return [dict(messages[i]) for i in sorted(indices)]

        newest_first = turn_indices_from_end(messages)
        kept = pinned_indices(messages, newest_first)
        need = tokenizer.count_messages(chosen(kept))
        if need > max_tokens:
            raise InputTooLong(
                max_tokens,
                f"the system messages and the newest user message{no_user_note(messages)} take {need} tokens, over the "
                f"{max_tokens} the context may use",
            )
        total = need
        older: list[list[int]] = []
        for turn in newest_first:  # on from there; stop at the first turn that does not fit
            if is_instruction(messages[turn[0]]):
                continue
            cost = self._costs(tokenizer, [dict(messages[i]) for i in turn])
            if total + cost > max_tokens:
                break
            total += cost
            older.append(turn)
        # The sum is exact for OpenAI's accounting; a chat template may join turns in a
        # way that costs a little more, so check the whole and shed the oldest if needed.
        while True:
            indices = sorted(kept + [i for turn in older for i in turn])
            if not older or tokenizer.count_messages(chosen(indices)) <= max_tokens:
                return indices
            older.pop()

    def __repr__(self) -> str:
        return "TailOnly()"
