"""Step 1, admit: cap the input with bounded work before anything else looks at it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tokenguard._settings import token_count
from tokenguard.context import content_text
from tokenguard.errors import InputTooLong
from tokenguard.pipeline.call import Call
from tokenguard.tokens import Tokenizer
from tokenguard.tokens.base import strings_in

__all__ = ["Admit", "over_limit"]


class Admit:
    """Refuse an input over ``max_input_tokens`` with :class:`~tokenguard.InputTooLong`.

    Each message's text, every string it holds (content, name, a tool call's arguments,
    any other field), is first counted with ``count_until``, whose work is bounded by
    the limit (a 100 MB message costs what a few tens of kilobytes do); only an input
    that passes is counted exactly, chat template included, and checked again.

    The input is what the caller sent: its messages, or for a chat call the new turn
    (the session's history was admitted turn by turn, and the fit step bounds it), and
    the tool definitions it passes.
    """

    def __init__(self, max_input_tokens: int) -> None:
        self.max_input_tokens = token_count("max_input_tokens", max_input_tokens)

    def __call__(self, call: Call) -> None:
        limit = self.max_input_tokens
        turn = call.turn_messages()
        messages = call.messages if turn is None else turn
        sent = [*messages, {"tools": list(call.tokenizer.tool_texts(call.tools))}] if call.tools else messages
        if over_limit(call.tokenizer, sent, limit):
            raise InputTooLong(limit, f"input exceeds max_input_tokens: it is over the limit of {limit} tokens")
        exact = call.count_input() if turn is None else call.tokenizer.count_messages(messages, tools=call.tools)
        if exact > limit:
            raise InputTooLong(
                limit,
                f"input exceeds max_input_tokens: {exact} tokens (chat template included) "
                f"is over the limit of {limit}",
            )


# Texts up to this many characters a token of the limit are left to the exact count
# (work bounded by the limit still): the pre-count is no exact lower bound of it.
_EXACT_CHARS_PER_TOKEN = 8


def over_limit(tokenizer: Tokenizer, messages: Iterable[Mapping[str, Any]], limit: int) -> bool:
    """Whether ``messages`` are too long for ``limit`` tokens by a count of their texts
    alone, with work bounded by the limit whatever their size; ``False`` for texts short
    enough to count exactly at that cost, which the caller's exact count then decides:
    the texts' sum is no strict lower bound of it (a template may leave a field out, and
    text parts count apart, where joined text can take more tokens)."""
    texts = [text for message in messages for text in _texts(message)]
    if sum(map(len, texts)) <= _EXACT_CHARS_PER_TOKEN * max(limit, 1):
        return False
    seen = 0
    for text in texts:
        seen += tokenizer.count_until(text, limit - seen)
        if seen > limit:
            return True
    return False


def _texts(message: Mapping[str, Any]) -> Iterator[str]:
    """The texts of a message that its exact count reads, but its role: the content's
    text parts, each tool call's function name and arguments, and every string of any
    other field (a name, a provider's extra field), at any depth."""
    for key, value in message.items():
        if key == "content" and isinstance(value, list):  # parts count apart (they may join into more)
            yield from (content_text([part]) for part in value)
        elif key == "content":
            yield content_text(value)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                function = call.get("function") if isinstance(call, Mapping) else None
                yield from strings_in([function.get("name"), function.get("arguments")] if isinstance(function, Mapping)
                                      else call)
        elif key != "role":
            yield from strings_in(value)
