"""Step 2, scope: a nested call sends its own messages and only what fits of the
context its ancestors already sent."""

from __future__ import annotations

import math
import sys

from tokenguard.context import Relevant, fingerprint
from tokenguard.errors import InputTooLong
from tokenguard.pipeline.call import Call
from tokenguard.pipeline.spared import SparedTokens

__all__ = ["TrimForwarded"]

_UNBOUNDED = sys.maxsize


class TrimForwarded:
    """Keep a nested call's own messages whole and fill what is left of its share of
    the parent's input with the most relevant forwarded context.

    A call made while another guarded call runs is its child (see
    :mod:`~tokenguard.pipeline.tree`). Its messages are *forwarded* when an ancestor in
    the same call tree was already sent the same message (its
    :func:`~tokenguard.context.fingerprint`: role, content and tool fields) and its
    *own* otherwise. Own messages are kept whole, with the system messages and the
    newest user message (the rules every context strategy keeps); forwarded ones fill
    what is left of ``share`` x the parent's exact input tokens, the most relevant to
    the own messages first, tool calls with their results, in their original order
    (``strategy``, :class:`~tokenguard.context.Relevant` by default). Counts are the
    backend's tokenizer's, chat template included, and the fit step still fits the
    result into the window after this.

    So a child's input is at most ``max(share x its parent's, what it must keep)``:
    a chain in which each level forwards everything it received plus a task of its own
    that fits its share costs at most ``1 + share + share**2 + ... < 1 / (1 - share)``
    times the root's input (4/3 at the default share of 1/4), where without trimming it
    costs about as many times the root's input as it has levels. A child is never
    refused for its own new messages by the share: it then sends them alone.

    A :func:`~tokenguard.scope`'s ``max_input_tokens`` bounds every call in it, root or
    nested: forwarded context is dropped to fit, and a call whose must-keep messages
    alone are longer raises :class:`~tokenguard.InputTooLong`. A root call (no guarded
    call above it) has nothing forwarded, so it is never trimmed. What trimming spared
    goes in ``call.scope_saved_tokens``.
    """

    def __init__(self, strategy: Relevant | None = None) -> None:
        self.strategy = strategy if strategy is not None else Relevant()
        self.spared = SparedTokens()

    def __call__(self, call: Call) -> None:
        outer = call.outer
        if outer is None:
            return
        limit = outer.max_input_tokens
        fill = math.floor(outer.share * outer.input_tokens) if outer.input_tokens is not None else None
        if limit is None and fill is None:
            return
        sent = outer.sent
        own = [i for i, message in enumerate(call.messages) if fingerprint(message) not in sent]
        if len(own) == len(call.messages):  # nothing forwarded, nothing to trim
            # A chat's history is left to the fit step, which fits it into the limit too:
            # only the new turn is the call's own to refuse.
            new = call.turn_messages() if call.turn is not None else None
            taken = call.count_input() if new is None else call.tokenizer.count_messages(new)
            if limit is not None and taken > limit:
                raise InputTooLong(
                    limit,
                    f"the call's {'new turn' if new is not None else 'input'} takes {taken} tokens, over the "
                    f"max_input_tokens of {limit} of scope {outer.name!r}",
                )
            return
        tools = call.tokenizer.count_tools(call.tools)  # sent whole: the messages get what is left
        if limit is not None:
            limit = max(limit - tools, 0)
        if fill is not None:
            fill = max(fill - tools, 0)
        try:
            fitted = self.strategy.fit(
                call.messages, _UNBOUNDED if limit is None else limit, call.tokenizer, keep=own, fill=fill
            )
        except InputTooLong as error:
            raise InputTooLong(error.limit, f"{error} (max_input_tokens of scope {outer.name!r})") from None
        if fitted != call.messages:  # a prompt that already fit keeps its count
            call.scope_saved_tokens = self.spared(call.tokenizer, call.messages, fitted)
            call.messages = fitted
            call.input_tokens = None  # counted again, exactly, after trimming

    def __repr__(self) -> str:
        return f"TrimForwarded({self.strategy!r})"
