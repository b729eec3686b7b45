"""Step 3, fit: build the messages to send so that they fit the model's window."""

from __future__ import annotations

from tokenguard.context import ContextStrategy
from tokenguard.errors import ConfigError
from tokenguard.pipeline.call import Call

__all__ = ["Fit"]


class Fit:
    """Fit ``call.messages`` with a context strategy into
    ``min(window - max_output_tokens, max_context_tokens)`` tokens, whichever are known:
    the window is the backend's (asked once, when the first call runs, so a model is
    loaded by then), ``max_context_tokens`` the user's own limit."""

    def __init__(
        self, strategy: ContextStrategy, *, window: int | None = None, max_context_tokens: int | None = None
    ) -> None:
        if max_context_tokens is not None and max_context_tokens < 1:
            raise ConfigError("max_context_tokens must be >= 1")
        self.strategy = strategy
        self.window = window
        self.max_context_tokens = max_context_tokens

    def budget(self, call: Call) -> int | None:
        """The tokens the call's prompt may take, or ``None`` when nothing bounds it."""
        window = self.window
        if window is None:
            window = self.window = call.backend.context_window()
        limits = [limit for limit in (self.max_context_tokens,) if limit is not None]
        if window is not None:
            limits.append(window - call.max_output_tokens)
        return min(limits) if limits else None

    def __call__(self, call: Call) -> None:
        budget = self.budget(call)
        if budget is None:
            return
        fitted = self.strategy.fit(call.messages, budget, call.tokenizer)
        if fitted != call.messages:  # a prompt that already fit keeps its count
            call.messages = fitted
            call.input_tokens = None  # counted again, exactly, after fitting
