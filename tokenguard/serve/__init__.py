"""``tokenguard serve``: an OpenAI-compatible HTTP gateway over a :class:`~tokenguard.Guard`.

The gateway speaks OpenAI's API (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``) plus ``/health`` and Prometheus ``/metrics``, and runs every request
through the guard: exact counts, caps, budgets and caches per user, one ledger row
per call. One module per job:

- :mod:`~tokenguard.serve.keys`: API keys to users, through a file of key hashes
- :mod:`~tokenguard.serve.parse`: OpenAI request bodies checked into guard calls
- :mod:`~tokenguard.serve.shapes`: answers in OpenAI's JSON and SSE shapes
- :mod:`~tokenguard.serve.errors`: failures as status codes and OpenAI error bodies
- :mod:`~tokenguard.serve.respond`: one call answered, cancelled when the client leaves
- :mod:`~tokenguard.serve.metrics`: the Prometheus text
- :mod:`~tokenguard.serve.app`: the Starlette app (:func:`create_app`)
- :mod:`~tokenguard.serve.server`: options to a guard, served by uvicorn (:func:`serve`)

The web stack (Starlette, uvicorn) comes with ``pip install 'tokenguard[serve]'``.
:func:`create_app`, :func:`serve` and their companions load it on first use, so key
management (:func:`add_key`) works without it and ``import tokenguard`` never loads it.

>>> from tokenguard.serve import create_app  # doctest: +SKIP
>>> app = create_app(tg.Guard(...), keys=KeyFile("keys.jsonl"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokenguard.errors import MissingDependency
from tokenguard.serve.keys import KeyFile, add_key, hash_key, new_key
from tokenguard.serve.metrics import Metrics

if TYPE_CHECKING:
    from tokenguard.serve.app import create_app
    from tokenguard.serve.server import ServeOptions, build_guard, serve

__all__ = ["INSTALL_SERVE", "KeyFile", "Metrics", "ServeOptions", "add_key", "build_guard", "create_app",
           "hash_key", "new_key", "serve"]

INSTALL_SERVE = "pip install 'tokenguard[serve]'"
_WEB = {"create_app": "tokenguard.serve.app", "ServeOptions": "tokenguard.serve.server",
        "build_guard": "tokenguard.serve.server", "serve": "tokenguard.serve.server"}


def __getattr__(name: str) -> Any:
    """Load the web stack's part of the package on first use."""
    module = _WEB.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        if error.name in ("starlette", "uvicorn") or (error.name or "").startswith(("starlette.", "uvicorn.")):
            raise MissingDependency("the gateway's web stack (starlette, uvicorn)", INSTALL_SERVE) from error
        raise
