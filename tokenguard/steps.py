"""The shapes of the pipeline's optional steps, for the issues that add them.

``Guard`` calls each configured step at its place in the pipeline (DESIGN.md):
admit, scope, fit, cache, reserve, generate, meter, settle, remember. A step the user
does not configure is absent (``None``), not a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tokenguard.call import Call
    from tokenguard.usage import Reply

__all__ = ["CacheStep", "FitStep", "RememberStep", "ScopeStep"]


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


@runtime_checkable
class RememberStep(Protocol):
    """Step 9: after a successful reply, store what later calls reuse (cache entries,
    session history, TTLs)."""

    def __call__(self, call: Call, reply: Reply) -> None: ...
