"""One request on its way through the guard's pipeline: what every step reads and fills in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenguard.backends.base import Backend, BackendUsage
    from tokenguard.budget import Reservation
    from tokenguard.tokens import Tokenizer
    from tokenguard.usage import Reply

__all__ = ["Call"]


@dataclass(slots=True, eq=False)
class Call:
    """The state of one call. Steps read the request part and fill in the rest.

    ``backend_input`` is what the backend is handed instead of ``messages`` when they
    differ in form (the decorator passes a prompt string through as a string).
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
    backend_input: Any = None
    ts: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    #: Exact prompt size, once counted (see :meth:`count_input`).
    input_tokens: int | None = None
    reservations: list[Reservation] = field(default_factory=list)
    backend_usage: BackendUsage | None = None
    #: A reply a step produced without the backend (a cache hit).
    reply: Reply | None = None

    def count_input(self) -> int:
        """The exact prompt size of ``messages`` (chat template and reply priming
        included), counted once."""
        if self.input_tokens is None:
            self.input_tokens = self.tokenizer.count_messages(self.messages)
        return self.input_tokens
