"""Step 9, remember: what a successful call leaves for the calls after it."""

from __future__ import annotations

import copy
from typing import Any

from tokenguard.accounting import Reply
from tokenguard.context import SessionHistory
from tokenguard.pipeline.call import Call

__all__ = ["RememberTurn"]


class RememberTurn:
    """Add a :meth:`~tokenguard.Guard.chat` turn and its reply to the session's history."""

    def __init__(self, history: SessionHistory) -> None:
        self.history = history

    def __call__(self, call: Call, reply: Reply) -> None:
        turn = call.turn_messages()
        if turn is not None and call.session is not None:
            answer: dict[str, Any] = {"role": "assistant", "content": reply.text}
            if reply.tool_calls:  # the tool results the caller sends next answer these
                answer["tool_calls"] = reply.tool_calls
            # The history's own copies: the turn and the reply are the caller's to change.
            self.history.append(call.session, *copy.deepcopy([*turn, answer]))
