"""The exceptions tokenguard raises. Every one derives from :class:`TokenGuardError`."""

from __future__ import annotations

from typing import Any


class TokenGuardError(Exception):
    """Base class of every error the SDK raises."""


class InvalidRequest(TokenGuardError, TypeError, ValueError):
    """A call's input is malformed: ``None`` or a dict where a list of messages belongs,
    a message without a role, content that is neither text nor a list of parts, an
    unknown ledger column or filter.

    It is a ``TypeError`` and a ``ValueError`` too, so code written to either of
    Python's conventions catches it.
    """


class ConfigError(TokenGuardError, TypeError, ValueError):
    """An option given to a :class:`~tokenguard.Guard`, a budget, a backend or a store
    is invalid: a negative limit, a backend that is neither a backend nor a function.
    A ``TypeError`` and a ``ValueError`` too, like :class:`InvalidRequest`."""


class InputTooLong(TokenGuardError, ValueError):
    """The input exceeds a token cap; raised before any generation work is done."""

    def __init__(self, limit: int, message: str | None = None) -> None:
        self.limit = limit
        super().__init__(message or f"input exceeds the limit of {limit} tokens")


class MissingDependency(TokenGuardError, ImportError):
    """An optional package is not installed; the message names the install command."""

    def __init__(self, what: str, install: str) -> None:
        self.install = install
        super().__init__(f"{what} is not installed; install it with: {install}")


class UnknownTokenizer(TokenGuardError, LookupError):
    """A tokenizer name or path that tokenguard cannot resolve."""


class BudgetExceeded(TokenGuardError):
    """A call's worst case does not fit a budget; raised before the backend is called.

    ``budget`` is the :class:`~tokenguard.Budget` that refused, ``key`` the scope it
    refused for (``"global"``, ``"user:alice"``, ...), ``needed`` and ``left`` the amounts
    in the budget's unit (``unit`` is ``"tokens"`` or ``"usd"``).
    """

    def __init__(
        self, budget: object, key: str, unit: str, needed: float, left: float
    ) -> None:
        self.budget = budget
        self.key = key
        self.unit = unit
        self.needed = needed
        self.left = left
        if unit == "usd":
            amounts = f"needs up to ${needed:.6f}, ${max(left, 0.0):.6f} left"
        else:
            amounts = f"needs up to {int(needed)} tokens, {int(max(left, 0))} left"
        super().__init__(f"budget {budget!r} exceeded for {key}: the call {amounts}")


class BackendError(TokenGuardError):
    """The backend failed: an error answer, or a stream that ended before it finished.
    ``status`` is the HTTP status, and ``detail`` what the server said in its error
    answer (its body's text), where there are."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        self.status = status
        self.detail = detail
        super().__init__(message)


class BackendTimeout(BackendError, TimeoutError):
    """The backend did not finish within the guard's ``timeout``: it hung, or generated
    for too long. The call is metered as an error and its reservation released."""


class StoreError(TokenGuardError, OSError):
    """A ledger or budget file cannot be opened or used: its path is a directory, its
    folder cannot be made, it is not a SQLite database, or it stayed locked past the busy
    timeout. The message names the file; the SQLite (or OS) error is chained as the cause.

    It is an ``OSError`` too, like the file errors it stands for. Raised for a call whose
    backend answered but whose ledger row could not be written, it carries the answer
    as ``reply`` (the row itself is logged at ERROR level, to be written again).
    """

    reply: Any = None
