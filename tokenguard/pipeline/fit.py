"""Step 3, fit: build the messages to send so that they fit the model's window."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tokenguard._settings import token_count
from tokenguard.accounting import context_window
from tokenguard.context import ContextStrategy, ConversationStrategy, Retrieval, content_text
from tokenguard.context.messages import is_instruction
from tokenguard.errors import InputTooLong
from tokenguard.pipeline.admit import over_limit
from tokenguard.pipeline.call import Call
from tokenguard.pipeline.spared import SparedTokens

__all__ = ["Fit", "SideCall"]

SideCall = Callable[[Call, list[dict[str, Any]], int, Any, str], str]
"""How the guard makes a model call on a call's behalf (a strategy's summary): the
call it serves, then what :data:`~tokenguard.context.Generate` takes (messages, token
cap, backend, tag); the reply's text comes back."""


def _adds_documents(strategy: ContextStrategy) -> bool:
    return isinstance(strategy, Retrieval) and bool(strategy.documents)


class Fit:
    """Fit ``call.messages`` with a context strategy into
    ``min(window - max_output_tokens, max_context_tokens)`` tokens, whichever are known:
    the window is the backend's (asked when the first call runs, so a model is loaded
    by then), else the catalogue's for the call's model (API models, from genai-prices),
    ``max_context_tokens`` the user's own limit. A
    :class:`~tokenguard.context.ConversationStrategy` is also given the call's session
    and, through ``side_call``, a way to ask a model (metered as a call of its own).
    What fitting spared goes in ``call.context_saved_tokens``."""

    def __init__(
        self,
        strategy: ContextStrategy,
        *,
        window: int | None = None,
        max_context_tokens: int | None = None,
        side_call: SideCall | None = None,
    ) -> None:
        if max_context_tokens is not None:
            max_context_tokens = token_count("max_context_tokens", max_context_tokens, minimum=1)
        self.strategy = strategy
        self.window = window
        self.max_context_tokens = max_context_tokens
        self.side_call = side_call
        self.spared = SparedTokens()

    def budget(self, call: Call) -> int | None:
        """The tokens the call's prompt may take, or ``None`` when nothing bounds it."""
        window = self.window
        if window is None:
            window = self.window = call.backend.context_window()
        if window is None:
            window = context_window(call.model)
        # A chat's history is the guard's to fit: a scope's max_input_tokens bounds it too.
        in_scope = call.outer.max_input_tokens if call.outer is not None and call.turn is not None else None
        limits = [limit for limit in (self.max_context_tokens, in_scope) if limit is not None]
        if window is not None:
            if call.max_output_tokens >= window:
                raise InputTooLong(
                    0,
                    f"max_tokens={call.max_output_tokens} leaves no room for a prompt in the model's "
                    f"{window}-token context: ask for fewer output tokens (max_output_tokens= on the Guard)",
                )
            limits.append(window - call.max_output_tokens)
        return min(limits) if limits else None

    def __call__(self, call: Call) -> None:
        budget = self.budget(call)
        if budget is None:
            return
        # A short prompt is counted whole (metering needs that count anyway) and, when
        # it fits, sent as it is (unless the strategy adds documents to every prompt);
        # a long history goes to the strategy, which counts only what it keeps.
        if (not _adds_documents(self.strategy) and sum(len(content_text(m.get("content"))) for m in call.messages)
                <= budget and call.count_input() <= budget):
            return
        tools = call.tokenizer.count_tools(call.tools)  # the tool definitions are sent whole
        room = budget - tools
        # What every strategy keeps must fit: found out with bounded work on a huge message.
        must_keep = [*filter(is_instruction, call.messages[:-1]), call.messages[-1]]
        if room < 0 or over_limit(call.tokenizer, must_keep, room):
            kept = "the system messages and the newest message" + (f" with {tools} tokens of tools" if tools else "")
            raise InputTooLong(budget, f"{kept} take over the {budget} tokens the context may use")
        strategy = self.strategy
        if isinstance(strategy, ConversationStrategy):
            generate = functools.partial(self.side_call, call) if self.side_call is not None else None
            fitted = strategy.fit(call.messages, room, call.tokenizer, session=call.session, generate=generate)
        else:
            fitted = strategy.fit(call.messages, room, call.tokenizer)
        if fitted != call.messages:  # a prompt that already fit keeps its count
            call.context_saved_tokens = self.spared(call.tokenizer, call.messages, fitted)
            call.messages = fitted
            call.input_tokens = None  # counted again, exactly, after fitting

    def end_session(self, session: str) -> None:
        """Free what the strategy keeps for ``session`` (a summary, an index)."""
        if isinstance(self.strategy, ConversationStrategy):
            self.strategy.end_session(session)
