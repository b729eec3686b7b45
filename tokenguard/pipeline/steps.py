"""The shapes of the pipeline's steps, for the features that plug into it.

``Guard`` calls each configured step at its place in the pipeline (DESIGN.md):
admit, scope, fit, cache, reserve, generate (its chunk watchers), meter, settle,
remember. A step the user does not configure is absent, not a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tokenguard.accounting import Reply
    from tokenguard.pipeline.call import Call

__all__ = ["CacheStep", "ChunkWatcher", "FitStep", "RememberStep", "ScopeStep", "Watch"]


@runtime_checkable
class ScopeStep(Protocol):
    """Step 2: a nested call takes its parent's scope (depth, a smaller budget, context)."""

    def __call__(self, call: Call) -> None: ...


@runtime_checkable
class FitStep(Protocol):
    """Step 3: build ``call.messages`` to fit the window (system pinned, newest kept)."""

    def __call__(self, call: Call) -> None: ...


@runtime_checkable
class CacheStep(Protocol):
    """Step 4: a reply for ``call`` without the backend, or ``None``. A hit is metered
    (its ``usage`` and ``stop_reason`` are written as they are) and returned at once."""

    def lookup(self, call: Call) -> Reply | None: ...


class Watch(Protocol):
    """One call's watch over its generated text (see :class:`ChunkWatcher`)."""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Take the next generated ``piece``; return the part of it to pass on and,
        to end the stream there, a stop reason (``"length"``, ``"repetition"``, ...)."""
        ...


@runtime_checkable
class ChunkWatcher(Protocol):
    """Step 6: something that watches every generated piece and may end the stream
    (the output cap; a repetition stopper). :meth:`watch` starts a fresh
    :class:`Watch` for each call, so one watcher serves concurrent calls."""

    def watch(self, call: Call) -> Watch: ...


@runtime_checkable
class RememberStep(Protocol):
    """Step 9: after a successful reply, store what later calls reuse (cache entries,
    session history, TTLs)."""

    def __call__(self, call: Call, reply: Reply) -> None: ...
