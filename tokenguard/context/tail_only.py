"""``TailOnly``: the newest turns that fit, and nothing older."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from tokenguard.context.strategy import Turn, turns
from tokenguard.errors import InputTooLong
from tokenguard.tokens import Tokenizer

__all__ = ["TailOnly"]

_CACHE_SIZE = 65_536  # per-turn counts remembered, least recently used dropped first


def _key(tokenizer: Tokenizer, turn: Turn) -> str:
    text = json.dumps(turn, sort_keys=True, ensure_ascii=False, default=str)
    return f"{tokenizer.name}:{hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=16).hexdigest()}"


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
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def _cost(self, tokenizer: Tokenizer, turn: Turn, empty: int) -> int:
        """What ``turn`` adds to a prompt (its framing included), remembered."""
        key = _key(tokenizer, turn)
        with self._lock:
            cost = self._counts.get(key)
            if cost is not None:
                self._counts.move_to_end(key)
                return cost
        cost = max(tokenizer.count_messages(turn) - empty, 0)
        with self._lock:
            self._counts[key] = cost
            while len(self._counts) > _CACHE_SIZE:
                self._counts.popitem(last=False)
        return cost

    def fit(self, messages: Sequence[Mapping[str, Any]], max_tokens: int, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        all_turns = turns(messages)
        pinned = [i for i, turn in enumerate(all_turns) if turn[0].get("role") == "system"]
        users = [i for i, turn in enumerate(all_turns) if turn[0].get("role") == "user"]
        newest = users[-1] if users else len(all_turns) - 1
        kept = set(pinned) | set(range(newest, len(all_turns)))  # the newest user turn and all after it

        def chosen(indices: set[int]) -> list[dict[str, Any]]:
            return [message for i in sorted(indices) for message in all_turns[i]]

        need = tokenizer.count_messages(chosen(kept))
        if need > max_tokens:
            raise InputTooLong(
                max_tokens,
                f"the system messages and the newest user message take {need} tokens, over the "
                f"{max_tokens} the context may use",
            )
        empty = tokenizer.count_messages([])
        total = need
        older: list[int] = []
        for i in range(newest - 1, -1, -1):  # newest first; stop at the first that does not fit
            if i in kept or all_turns[i][0].get("role") == "tool":
                continue  # pinned already; or a tool result whose call is gone: never sent alone
            cost = self._cost(tokenizer, all_turns[i], empty)
            if total + cost > max_tokens:
                break
            total += cost
            older.append(i)
        # The sum is exact for OpenAI's accounting; a chat template may join turns in a
        # way that costs a little more, so check the whole and shed the oldest if needed.
        while True:
            result = chosen(kept | set(older))
            if not older or tokenizer.count_messages(result) <= max_tokens:
                return result
            older.pop()

    def __repr__(self) -> str:
        return "TailOnly()"
