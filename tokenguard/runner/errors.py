"""Errors specific to the bundled runner."""

from __future__ import annotations

from tokenguard.errors import TokenGuardError


class UnsupportedModel(TokenGuardError, ValueError):
    """The checkpoint is not something the runner can execute.

    The message names what was found: the architecture, the quantization type or the
    rope-scaling kind, and the file it came from.
    """


class ModelNotFound(TokenGuardError, FileNotFoundError):
    """The model path given to the runner does not exist."""
