"""The shapes of the pipeline's steps, for the features that plug into it.

``Guard`` calls each configured step at its place in the pipeline (docs/architecture.md):
admit, scope, fit, cache, reserve, generate (its chunk watchers), meter, settle,
remember. A step the user does not configure is absent, not a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tokenguard.accounting import Reply
    from tokenguard.pipeline.call import Call

__all__ = ["CacheStep", "ChunkWatcher", "FitStep", "RememberStep", "ScopeStep", "Stop", "Watch"]


@runtime_checkable
class ScopeStep(Protocol):
    """Step 2: a nested call takes its parent's scope: a smaller budget and only the
    context it needs (``call.outer`` says where it sits in its call tree). The default
    is :class:`~tokenguard.pipeline.TrimForwarded`."""

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

    def store(self, call: Call, reply: Reply) -> None:
        """Step 9: keep ``reply`` as the answer to ``call`` (when it is worth keeping)."""
        ...


@dataclass(frozen=True, slots=True)
class Stop:
    """A watcher's decision to end the stream.

    ``keep`` is the part of the current piece still passed on; ``drop`` how many
    characters at the end of the text passed on so far (``keep`` included) the final
    reply leaves out, such as the repeats of a loop (they were generated, so they are
    still metered); ``saves`` whether ending here spares tokens the backend would
    otherwise have generated (a repetition stop does; the output cap is the limit
    itself, so it does not).
    """

    reason: str
    keep: str = ""
    drop: int = 0
    saves: bool = True


class Watch(Protocol):
    """One call's watch over its generated text (see :class:`ChunkWatcher`)."""

    def feed(self, piece: str) -> str | Stop:
        """Take the next generated ``piece``: return the text to pass on (usually the
        piece itself), or a :class:`Stop` to end the stream here."""
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
