"""What a call returns: :class:`Reply`, with its metered :class:`Usage`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Reply", "Usage"]


@dataclass(slots=True)
class Usage:
    """Exact token counts, cost and latency of one call.

    ``input_tokens`` includes ``cached_input_tokens`` (as in OpenAI's ``usage``).
    ``cost_usd`` is ``None`` when the model's price is unknown, never a guess.
    ``saved_tokens`` is what the guard spared, all mechanisms together: for a cache hit,
    the tokens of the call that stored the answer (a hit itself bills none); for a
    stream ended early (a repetition stop), an estimate: the rest of
    ``max_output_tokens``; and the prompt tokens that context fitting
    (``context_saved_tokens``: older turns dropped or folded into a summary) and scope
    trimming (``scope_saved_tokens``: a nested call's forwarded context left out) kept
    from being sent. ``saved_usd`` is their price (``None`` when the model's price is
    unknown).
    ``depth`` is the call's place in its call tree: 0 for a root call, 1 for a guarded
    call made while a root call ran (see :func:`~tokenguard.scope`), and so on.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_usd: float | None = None
    latency_s: float = 0.0
    saved_tokens: int = 0
    saved_usd: float | None = 0.0
    depth: int = 0
    context_saved_tokens: int = 0
    scope_saved_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """``input_tokens + output_tokens``: what a token budget counts."""
        return self.input_tokens + self.output_tokens

    # OpenAI's names, for code that expects them.
    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens

    @property
    def completion_tokens(self) -> int:
        return self.output_tokens


@dataclass(slots=True)
class Reply:
    """The result of a guarded call.

    ``stop_reason`` is ``"stop"`` (the model finished), ``"length"`` (it hit
    ``max_output_tokens``), ``"cancelled"``, ``"error"``, or a reason a later step adds.
    ``messages`` is exactly what was sent to the backend. ``cached`` is ``True`` when
    the answer came from a cache (``stop_reason`` ``"cache"``): the backend was not called;
    ``cached_stop_reason`` is then the stop reason of the call that stored it
    (``"length"``: the answer was cut at its output cap). ``tool_calls`` are the tools
    the model called, in OpenAI's shape (``stop_reason`` ``"tool_calls"``), else ``None``.
    """

    text: str
    stop_reason: str
    messages: list[dict[str, Any]]
    usage: Usage = field(default_factory=Usage)
    request_id: str = ""
    model: str | None = None
    cached: bool = False
    cached_stop_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def __str__(self) -> str:
        return self.text
