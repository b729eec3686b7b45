"""Backends: what the guard drives. Each is a transport with one streaming method
(``stream``) and its async twin (``astream``); see :class:`Backend`."""

from tokenguard.backends.base import Backend, BackendUsage, Chunk, Params
from tokenguard.backends.bundled_runner import BundledRunner
from tokenguard.backends.function import Function
from tokenguard.backends.openai_compatible import OpenAICompatible
from tokenguard.backends.transformers import Transformers
from tokenguard.errors import BackendError

__all__ = [
    "Backend",
    "BackendError",
    "BackendUsage",
    "BundledRunner",
    "Chunk",
    "Function",
    "OpenAICompatible",
    "Params",
    "Transformers",
]
