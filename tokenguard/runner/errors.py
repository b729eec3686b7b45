"""Errors specific to the bundled runner."""

from __future__ import annotations

from tokenguard.errors import BackendError, TokenGuardError


class UnsupportedModel(TokenGuardError, ValueError):
    """The checkpoint is not something the runner can execute.

    The message names what was found: the architecture, the quantization type or the
    rope-scaling kind, and the file it came from.
    """


class ModelNotFound(TokenGuardError, FileNotFoundError):
    """The model path given to the runner does not exist."""


class EngineDied(BackendError):
    """The runner's engine process ended while the runner was open: killed, out of
    memory, or crashed. Every request it was serving and every later call of the runner
    raises this, naming the process and how it ended; close the runner and build a new
    one. (A :class:`~tokenguard.errors.BackendError`: the guard meters such a call as
    failed.)"""
