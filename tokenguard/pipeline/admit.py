"""Step 1, admit: cap the input with bounded work before anything else looks at it."""

from __future__ import annotations

from tokenguard._settings import token_count
from tokenguard.context import content_text
from tokenguard.errors import InputTooLong
from tokenguard.pipeline.call import Call

__all__ = ["Admit"]


class Admit:
    """Refuse an input over ``max_input_tokens`` with :class:`~tokenguard.InputTooLong`.

    Each message's text is first counted with ``count_until``, whose work is bounded by
    the limit (a 100 MB message costs what a few tens of kilobytes do); only an input
    that passes is counted exactly, chat template included, and checked again.

    The input is what the caller sent: its messages, or for a chat call the new turn
    (the session's history was admitted turn by turn, and the fit step bounds it).
    """

    def __init__(self, max_input_tokens: int) -> None:
        self.max_input_tokens = token_count("max_input_tokens", max_input_tokens)

    def __call__(self, call: Call) -> None:
        limit = self.max_input_tokens
        messages = call.messages if call.turn is None else [call.turn]
        seen = 0
        for message in messages:
            seen += call.tokenizer.count_until(content_text(message.get("content")), limit - seen)
            if seen > limit:
                raise InputTooLong(
                    limit, f"input exceeds max_input_tokens: it is over the limit of {limit} tokens"
                )
        exact = call.count_input() if call.turn is None else call.tokenizer.count_messages(messages)
        if exact > limit:
            raise InputTooLong(
                limit,
                f"input exceeds max_input_tokens: {exact} tokens (chat template included) "
                f"is over the limit of {limit}",
            )
