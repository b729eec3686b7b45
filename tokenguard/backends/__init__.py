"""Backends: what the guard drives. Each is a transport with one streaming method
(``stream``) and its async twin (``astream``); see :class:`Backend`."""

from tokenguard.backends.base import Backend, BackendUsage, Chunk, Params
from tokenguard.backends.callable import Callable
from tokenguard.backends.openai_compatible import BackendError, OpenAICompatible
from tokenguard.backends.runner import Runner
from tokenguard.backends.transformers import Transformers

__all__ = [
    "Backend",
    "BackendError",
    "BackendUsage",
    "Callable",
    "Chunk",
    "OpenAICompatible",
    "Params",
    "Runner",
    "Transformers",
]
