"""``tokenguard serve``: build the guard the options describe and serve it with uvicorn.

The backend is the bundled runner (its continuous batching serves concurrent clients)
or, with ``upstream``, an OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama,
OpenAI), which the gateway then meters, caches and budgets. An upstream's API key is
read from the ``TOKENGUARD_UPSTREAM_API_KEY`` environment variable, never from the
command line (where ``ps`` would show it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenguard._guard import Guard
from tokenguard.accounting import Budget, PriceSpec
from tokenguard.backends import Backend, BundledRunner, OpenAICompatible
from tokenguard.cache import ExactCache
from tokenguard.errors import ConfigError, UnknownTokenizer
from tokenguard.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_THREADS, create_app
from tokenguard.serve.keys import KeyFile

__all__ = ["UPSTREAM_KEY_ENV", "ServeOptions", "build_guard", "listen", "serve"]

logger = logging.getLogger(__name__)

#: The environment variable an upstream's API key is read from.
UPSTREAM_KEY_ENV = "TOKENGUARD_UPSTREAM_API_KEY"
_GRACEFUL_S = 10  # how long a stopping server lets answers in progress finish


@dataclass
class ServeOptions:
    """What ``tokenguard serve`` was asked for (see its ``--help``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    keys: str | None = None
    ledger: str | None = None
    budget_tokens: int | None = None
    budget_per: Literal["user", "session", "global"] = "user"
    budget_window: Literal["hour", "day", "month"] | None = None
    budget_store: str | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int = 512
    cache: str | None = None
    upstream: str | None = None
    model: str | None = None
    tokenizer: str | None = None
    price: tuple[float, float] | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    threads: int = DEFAULT_THREADS
    access_log: bool = False
    #: Closed with the guard when the server stops (a cache's files).
    closers: list[Callable[[], None]] = field(default_factory=list)


def _backend(options: ServeOptions) -> tuple[Backend, str]:
    """The backend and the model name clients ask for."""
    if options.upstream is not None:
        if not options.model:
            raise ConfigError("--upstream needs --model: the model name the upstream server serves")
        return OpenAICompatible(options.upstream, options.model, os.environ.get(UPSTREAM_KEY_ENV) or None,
                                tokenizer=options.tokenizer), options.model
    if options.tokenizer is not None:
        raise ConfigError("--tokenizer goes with --upstream: the bundled runner counts with its model's own")
    if options.model is not None and not Path(options.model).exists():
        raise ConfigError(f"no model at {options.model} (pass a .gguf file or a checkpoint folder, or --upstream)")
    backend = BundledRunner(model=options.model)
    return backend, Path(backend.model).name if options.model else backend.model


def build_guard(options: ServeOptions) -> tuple[Guard, str]:
    """The guard the options describe, and the model name it is served under. What
    else must be closed with it (the cache) is added to ``options.closers``."""
    backend, served = _backend(options)
    prices: dict[str, PriceSpec] = {}
    if options.price is not None:
        prices[backend.model or served] = options.price
    elif isinstance(backend, BundledRunner):
        prices[backend.model] = (0.0, 0.0)  # a local model costs no money per token
    budget = None
    if options.budget_tokens is not None:
        budget = Budget(tokens=options.budget_tokens, per=options.budget_per, window=options.budget_window,
                        store=options.budget_store)
    elif options.budget_store is not None:
        raise ConfigError("--budget-store needs --budget-tokens")
    cache = None
    if options.cache is not None:
        cache = ExactCache(options.cache)  # partitioned per user
        options.closers.append(cache.close)
    guard = Guard(backend, model=None if isinstance(backend, BundledRunner) else options.model,
                  max_input_tokens=options.max_input_tokens, max_output_tokens=options.max_output_tokens,
                  budget=budget, ledger=options.ledger, prices=prices, cache=cache)
    return guard, served


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a port in use is a one-line ConfigError.

    Made with ``proto=IPPROTO_TCP``: asyncio turns Nagle's algorithm off only on
    connections of such sockets (uvloop does it for any), and with it on, an answer
    written in two parts (headers, then body) waits ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(options: ServeOptions, *, announce: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM let answers in progress finish).

    The port is bound and the model loaded before the first request is taken, so a
    mistake in either is reported at once; ``announce`` is told the URL then."""
    import uvicorn

    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(listen(options.host, options.port))
        keys = KeyFile(options.keys) if options.keys is not None else None
        guard, served = build_guard(options)
        for close in options.closers:
            stack.callback(close)
        stack.callback(guard.close)
        try:
            guard.warmup()
        except UnknownTokenizer:
            raise ConfigError(
                f"tokenguard does not know the tokenizer of model {served!r}, so it cannot count its tokens: pass "
                "--tokenizer with a tokenizer name (o200k_base, cl100k_base, ...) or a tokenizer.json, .model or "
                ".gguf file"
            ) from None
        app = create_app(guard, keys=keys, model=served, max_body_bytes=options.max_body_bytes,
                         threads=options.threads)
        host, port = sock.getsockname()[:2]
        if announce is not None:
            shown = f"[{host}]" if ":" in host else host
            who = (f"{len(keys.users)} users in {options.keys}" if keys is not None
                   else "open: the user is the request's 'user' field, which any client may set")
            announce(f"serving {served} on http://{shown}:{port}/v1 ({who}; ledger: {options.ledger or 'in memory'})")
        config = uvicorn.Config(app, log_level="warning", access_log=options.access_log, lifespan="on",
                                timeout_graceful_shutdown=_GRACEFUL_S, log_config=_log_config())
        with _stopped_by_signals():
            uvicorn.Server(config).run(sockets=[sock])


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with tokenguard's own warnings and errors (a failed request's
    id and cause, a key file that stopped parsing) written beside uvicorn's, unless
    the process already handles the ``tokenguard`` logger itself."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    ours = logging.getLogger("tokenguard")
    if not any(not isinstance(handler, logging.NullHandler) for handler in ours.handlers):
        config["loggers"]["tokenguard"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


class _Stop(BaseException):
    """SIGTERM, after uvicorn's graceful shutdown (it re-raises the signals it caught)."""


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """A server stopped by Ctrl-C or SIGTERM returns normally, after uvicorn has let the
    answers in progress finish, so that the guard and the ledger are closed: uvicorn
    re-raises the signal it caught, which would otherwise end the process there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
