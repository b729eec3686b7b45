"""``Relevant``: what must be kept, then the older turns most related to it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from tokenguard.context.messages import is_instruction, message_text, terms
from tokenguard.context.strategy import TurnCosts, no_user_note, pinned_indices, turn_indices_from_end
from tokenguard.errors import InputTooLong
from tokenguard.tokens import Tokenizer

__all__ = ["Relevant"]

def _words(text: str) -> set[str]:
    """The distinct terms of ``text`` (see :func:`~tokenguard.context.messages.terms`:
    Chinese, which has no spaces, by character pairs)."""
    return set(terms(text))


class Relevant:
    """Keep what must be kept, then the older turns most relevant to it that fit.

    Always kept (or :class:`~tokenguard.InputTooLong` is raised), as by every strategy:
    the system messages and the newest user message with whatever follows it; and here
    also every turn holding a message whose index is in ``keep`` (a nested call's own
    new messages). The other turns are ranked by the words they share with the kept
    non-system messages, each word weighted by how rare it is among those turns (a word
    every turn has counts for little, a name only two turns mention for much); ties go
    to the newer turn, so with nothing in common this keeps the newest turns, as
    :class:`~tokenguard.context.TailOnly` does. They are taken in that order while they
    fit, and sent in their original order; a tool call travels with its results.

    ``fill`` bounds the optional turns: the result is at most ``max(fill, what must be
    kept)`` tokens, and never more than ``max_tokens``. Counting each turn is
    remembered by content, and a turn is counted only as far as the room left
    (``count_until``); ranking reads the words of every candidate turn once.

    >>> from tokenguard import get_tokenizer
    >>> notes = [{"role": "user", "content": f"note {i}: the {topic} is fine"}
    ...          for i, topic in enumerate(["cache", "billing", "search", "login"])]
    >>> ask = {"role": "user", "content": "What about billing?"}
    >>> [m["content"] for m in Relevant().fit([*notes, ask], 30, get_tokenizer("gpt-4o"))]
    ['note 1: the billing is fine', 'What about billing?']
    """

    def __init__(self) -> None:
        self._costs = TurnCosts()

    def fit(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int,
        tokenizer: Tokenizer,
        *,
        keep: Collection[int] = (),
        fill: int | None = None,
    ) -> list[dict[str, Any]]:
        def chosen(indices: Collection[int]) -> list[dict[str, Any]]:
            return [dict(messages[i]) for i in sorted(indices)]

        newest_first = turn_indices_from_end(messages)
        pinned = pinned_indices(messages, newest_first)
        must = set(pinned)
        keep = set(keep)
        candidates: list[list[int]] = []  # newest first
        for turn in newest_first:
            if is_instruction(messages[turn[0]]):
                continue  # pinned already
            if keep.intersection(turn):
                must.update(turn)
            else:
                candidates.append(turn)
        need = tokenizer.count_messages(chosen(must))
        if need > max_tokens:
            raise InputTooLong(
                max_tokens,
                f"the messages that must be kept (system messages, the newest user message{no_user_note(messages)} and "
                f"{len(keep)} more) take {need} tokens, over the {max_tokens} the context may use",
            )
        room = max_tokens if fill is None else min(max_tokens, max(fill, need))
        if not candidates or room <= need:
            return chosen(must)
        query = set[str]().union(
            *(_words(message_text(messages[i])) for i in must if not is_instruction(messages[i]) or i in keep)
        )
        texts = ["\n".join(message_text(messages[i]) for i in turn) for turn in candidates]
        shared = [_words(text) & query for text in texts]
        frequency = Counter(word for words in shared for word in words)
        weight = {word: math.log(1 + len(candidates) / n) for word, n in frequency.items()}
        score = [sum(weight[word] for word in words) for words in shared]
        ranked = sorted(range(len(candidates)), key=lambda k: (-score[k], k))  # k = 0 is the newest

        total = need
        taken: list[list[int]] = []  # most relevant first
        for k in ranked:
            left = room - total
            if left <= 0:
                break
            text = texts[k]
            # Bounded work: a turn whose text alone is over what is left is not counted whole.
            if len(text) > left and tokenizer.count_until(text, left) > left:
                continue
            cost = self._costs(tokenizer, [dict(messages[i]) for i in candidates[k]])
            if cost <= left:
                total += cost
                taken.append(candidates[k])
        # The sum is exact for OpenAI's accounting; a chat template may join turns in a
        # way that costs a little more, so check the whole and shed the least relevant.
        while True:
            result = chosen(must.union(*taken))
            if not taken or tokenizer.count_messages(result) <= room:
                return result
            taken.pop()

    def __repr__(self) -> str:
        return "Relevant()"
