"""One request on its way through the guard's pipeline: what every step reads and fills in."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenguard.errors import InvalidRequest
from tokenguard.tokens import check_message

if TYPE_CHECKING:
    from tokenguard.accounting import Reservation
    from tokenguard.backends import Backend
    from tokenguard.pipeline.tree import Frame
    from tokenguard.tokens import Tokenizer

__all__ = ["Call", "as_messages"]


def as_messages(prompt_or_messages: object) -> list[dict[str, Any]]:
    """A prompt string as one user message, or a copy of a checked message list.

    Raises :class:`~tokenguard.InvalidRequest` for anything else: ``None``, a single
    message dict (wrap it in a list), a message without a role, content that is
    neither a string nor a list of parts, or no content outside an assistant message.
    """
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    if prompt_or_messages is None or isinstance(prompt_or_messages, (Mapping, bytes)):
        kind = "a dict (wrap one message in a list)" if isinstance(prompt_or_messages, Mapping) else (
            type(prompt_or_messages).__name__
        )
        raise InvalidRequest(f"a call takes a prompt string or a list of message dicts, got {kind}")
    try:
        items = list(prompt_or_messages)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidRequest(
            f"a call takes a prompt string or a list of message dicts, got {type(prompt_or_messages).__name__}"
        ) from None
    if not items:
        raise InvalidRequest("a call needs at least one message")
    return [dict(check_message(i, message)) for i, message in enumerate(items)]


@dataclass(slots=True, eq=False)
class Call:
    """The state of one call. Steps read the request part and fill in the rest.

    ``turn`` is the new message of a :meth:`~tokenguard.Guard.chat` call (or messages:
    the results of the tools its last answer called): the remember step adds them and
    the reply to the session's history when the call succeeds.
    ``outer`` is the :class:`~tokenguard.pipeline.tree.Frame` the call was made in: the
    guarded call it is nested in and the innermost scope, if any (``None``: a root call
    outside every scope); :attr:`depth`, :attr:`parent_id` and :attr:`root_id` link the
    call into its tree.
    """

    request_id: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    max_output_tokens: int
    model: str
    backend: Backend
    tokenizer: Tokenizer
    user: str | None = None
    session: str | None = None
    tags: Any = None
    turn: list[dict[str, Any]] | dict[str, Any] | None = None
    ts: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    #: Exact prompt size, once counted (see :meth:`count_input`).
    input_tokens: int | None = None
    reservations: list[Reservation] = field(default_factory=list)
    outer: Frame | None = None
    #: Prompt tokens spared by trimming forwarded context (scope step) and by fitting
    #: the history into the window (fit step); see :class:`~tokenguard.pipeline.spared.SparedTokens`.
    scope_saved_tokens: int = 0
    context_saved_tokens: int = 0
    #: Whether a guard has run it: a call runs once (its request_id names one ledger row
    #: and its holds), so opening it again is refused.
    opened: bool = False
    #: A call the guard makes itself on another's behalf (a context strategy's summary):
    #: the caller's input cap, scope trimming and context fitting are for what callers
    #: send, not for it (its prompt is sized to fit already).
    side: bool = False
    #: The backend's cache identity, taken once (at the cache lookup) so that the answer
    #: is stored under the key it was looked up by, whatever the function changes meanwhile.
    backend_identity: Any = None

    @property
    def depth(self) -> int:
        """0 for a root call, 1 for a call made while a root call runs, and so on."""
        return self.outer.depth + 1 if self.outer is not None else 0

    @property
    def parent_id(self) -> str | None:
        """The ``request_id`` of the guarded call this one is nested in (``None``: a root)."""
        return self.outer.request_id if self.outer is not None else None

    @property
    def root_id(self) -> str:
        """The ``request_id`` of the root call of this call's tree (its own, for a root)."""
        root = self.outer.root_id if self.outer is not None else None
        return root if root is not None else self.request_id

    @property
    def scope_name(self) -> str | None:
        """The name of the innermost :func:`~tokenguard.scope` the call was made in."""
        return self.outer.name if self.outer is not None else None

    def turn_messages(self) -> list[dict[str, Any]] | None:
        """:attr:`turn` as a list of messages (one message dict, as it once was, is one)."""
        return [self.turn] if isinstance(self.turn, Mapping) else self.turn

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The tool definitions the backend is sent: part of the prompt. ``tools=``, and
        the legacy ``functions=`` as the function tools they are."""
        tools, functions = self.params.get("tools"), self.params.get("functions")
        if functions is None:
            return tools
        if isinstance(functions, (str, bytes, Mapping)) or not isinstance(functions, Sequence):
            raise InvalidRequest(f"functions must be a list of function dicts, got {type(functions).__name__}")
        return [*(tools or []), *({"type": "function", "function": function} for function in functions)]

    def count_input(self) -> int:
        """The exact prompt size of ``messages`` (chat template, tool definitions and
        reply priming included), counted once."""
        if self.input_tokens is None:
            self.input_tokens = self.tokenizer.count_messages(self.messages, tools=self.tools)
        return self.input_tokens
