"""The OpenAI-compatible HTTP gateway over a :class:`~tokenguard.Guard`, as a Starlette app.

=============================== ==========================================================
``POST /v1/chat/completions``   a chat completion, whole or streamed (SSE), through the guard
``POST /v1/completions``        the same for a ``prompt`` (sent as one user message)
``GET /v1/models``              the one model served
``GET /health``                 ``{"status": "ok", "model": ...}`` once the model is loaded
``GET /metrics``                Prometheus text (:mod:`tokenguard.serve.metrics`)
=============================== ==========================================================

Identity: with a :class:`~tokenguard.serve.keys.KeyFile` the bearer key names the
user (a missing or unknown key is a 401 before the body is read); without one the
gateway is open and the user is the request's ``user`` field. An ``X-Session-Id``
header names the session, within the user (the ledger says ``alice/chat-1``), so
per-session budgets and the bundled runner's KV reuse never cross users. Budgets,
cache partitions and ledger rows are then the guard's, per user.

Each request is one guarded call driven through ``guard.prepare`` and
``guard.open_astream``, as the ``@guard`` decorator does; see
:mod:`tokenguard.serve.respond` for how an answer is sent and a departed client
cancels its call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenguard._guard import Guard
from tokenguard.backends import BundledRunner, Function, OpenAICompatible
from tokenguard.pipeline import Call
from tokenguard.serve.errors import ApiError, invalid
from tokenguard.serve.keys import KeyFile
from tokenguard.serve.metrics import CONTENT_TYPE, Metrics
from tokenguard.serve.parse import (
    BUNDLED_PARAMS,
    COMMON_PARAMS,
    UPSTREAM_PARAMS,
    ParsedRequest,
    parse_chat,
    parse_completion,
)
from tokenguard.serve.respond import GuardedResponse

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_THREADS", "SESSION_HEADER", "create_app"]

#: The largest request body read (bytes); a larger one is refused with 413 unread.
DEFAULT_MAX_BODY_BYTES = 4 << 20
#: Worker threads for the guard's blocking steps (opening and ending each call; a sync
#: function backend holds one for its whole answer).
DEFAULT_THREADS = 64
#: The request header that names a session.
SESSION_HEADER = "x-session-id"
_MAX_SESSION_CHARS = 128
_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})
_CLIENT_LEFT = 499  # nginx's status for a client that closed the request before an answer
_ARRIVED = "tokenguard.arrived"  # the ASGI scope key of a request's perf_counter() arrival


def _sampling_params(guard: Guard) -> frozenset[str]:
    """The sampling parameters the guard's backend takes (a function: those its
    signature names, or all with ``**kwargs``)."""
    backend = guard.backend
    if isinstance(backend, BundledRunner):
        return BUNDLED_PARAMS
    if isinstance(backend, OpenAICompatible):
        return UPSTREAM_PARAMS
    if isinstance(backend, Function):
        return frozenset(name for name in COMMON_PARAMS if backend.accepts(name))
    return COMMON_PARAMS


def _engine_stats(guard: Guard) -> Callable[[], Mapping[str, int] | None] | None:
    backend = guard.backend
    if not isinstance(backend, BundledRunner):
        return None
    return lambda: backend.runner.stats()  # loaded at startup (the lifespan warms the guard up)


def _too_large(limit: int) -> ApiError:
    # Sent before the body is read: the connection cannot be used again.
    return ApiError(413, f"the request body is over this gateway's limit of {limit} bytes",
                    headers={"connection": "close"}, reason="body_too_large")


# JSON may escape half of a UTF-16 pair alone ("\ud800"): Python decodes it to a str that
# no UTF-8 encoder (SQLite's, an upstream request's) takes. Only such an escape makes one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in the parsed JSON ``value`` (keys included) is no text."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


class _Measured:
    """ASGI middleware: count every request by endpoint and status, and time it to its
    last byte (a streamed answer included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = scope[_ARRIVED] = time.perf_counter()
        status = _CLIENT_LEFT

        async def measured_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.started()
        try:
            await self.app(scope, receive, measured_send)
        except BaseException:
            if status == _CLIENT_LEFT:
                status = 500
            raise
        finally:
            self.metrics.ended()
            self.metrics.observe_request(_endpoint(scope["path"]), status, time.perf_counter() - arrived)


def _endpoint(path: str) -> str:
    """A request's endpoint label: its route (one label for every model's page), or
    "other" (so a scan of random paths cannot grow the metrics without bound)."""
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class Gateway:
    """The routes' state: the guard, who may call, and the limits on what they send."""

    def __init__(self, guard: Guard, *, keys: KeyFile | None, model: str, metrics: Metrics,
                 max_body_bytes: int) -> None:
        self.guard = guard
        self.keys = keys
        self.model = model
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.params = _sampling_params(guard)
        self.budget_scopes = {budget.per for budget in guard.budgets}

    # -- the steps of a completion request -----------------------------------------------

    def _key_user(self, request: Request) -> str | None:
        """The user the bearer key names (``None`` when the gateway is open)."""
        if self.keys is None:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        user = self.keys.user_of(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if user is None:
            said = "no API key was given" if not key.strip() else "the API key is not valid"
            raise ApiError(401, f"{said}: send 'Authorization: Bearer KEY' with a key this gateway issued",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"}, reason="unauthorized")
        return user

    async def _body(self, request: Request) -> Any:
        """The request's JSON, read up to ``max_body_bytes`` (straight from ``receive``:
        Starlette's body stream costs more than the little it adds here)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        while True:
            message = await request.receive()
            if message["type"] != "http.request":  # the client left before its body arrived
                raise invalid("the request body was cut short")
            body.extend(message.get("body", b""))
            if len(body) > limit:
                raise _too_large(limit)
            if not message.get("more_body", False):
                break
        try:
            text = body.decode("utf-8-sig")  # json.loads would take UTF-16 and UTF-32 bytes too
        except UnicodeDecodeError:
            raise invalid("the request body is not UTF-8 text") from None
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            raise invalid("the request body is not valid JSON") from None
        if _SURROGATE_ESCAPE.search(body) and _holds_lone_surrogate(parsed):
            raise invalid("the request body holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape), "
                          "which is no text")
        return parsed

    def _session(self, request: Request, user: str | None) -> str | None:
        session = request.headers.get(SESSION_HEADER)
        if session is None:
            return None
        if not session or len(session) > _MAX_SESSION_CHARS or not session.isprintable():
            raise invalid(f"the {SESSION_HEADER} header must be 1 to {_MAX_SESSION_CHARS} printable characters")
        if user is None:
            return session
        # The first "/" ends the user's part ("%" and "/" in a name are escaped), so user
        # "a/b" with session "c" and user "a" with session "b/c" stay two sessions.
        return f"{user.replace('%', '%25').replace('/', '%2F')}/{session}"

    def _check_scopes(self, user: str | None, session: str | None) -> None:
        """A per-user (per-session) budget needs a user (a session): say how to give one."""
        if "user" in self.budget_scopes and user is None:
            how = "an API key" if self.keys is not None else "the 'user' field"
            raise invalid(f"this gateway's budget is per user, but the request names no user: send {how}", "user")
        if "session" in self.budget_scopes and session is None:
            raise invalid(f"this gateway's budget is per session: send an {SESSION_HEADER} header")

    async def complete(self, request: Request, parse: Callable[..., ParsedRequest]) -> Response:
        """Answer one completion request (``parse`` reads its kind of body)."""
        arrived = request.scope.get(_ARRIVED) or time.perf_counter()
        try:
            user = self._key_user(request)
            parsed = parse(await self._body(request), model=self.model, allowed=self.params)
            if self.keys is None:
                user = parsed.user
            session = self._session(request, user)
            self._check_scopes(user, session)
        except ApiError as error:
            if error.reason is not None:
                self.metrics.refused(error.reason)
            return JSONResponse(error.body(), error.status, error.headers)

        def prepare() -> Call:  # when the call opens: in the guard's worker thread, or inline
            return self.guard.prepare(parsed.messages, user=user, session=session, tags=parsed.tags,
                                      **parsed.params)

        return GuardedResponse(self.guard, prepare, parsed, model=self.model, metrics=self.metrics, arrived=arrived)

    # -- routes --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self.complete(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, parse_completion)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "tokenguard"}

    async def models(self, request: Request) -> Response:
        try:
            self._key_user(request)
        except ApiError as error:
            self.metrics.refused("unauthorized")
            return JSONResponse(error.body(), error.status, error.headers)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        try:
            self._key_user(request)
        except ApiError as error:
            self.metrics.refused("unauthorized")
            return JSONResponse(error.body(), error.status, error.headers)
        if request.path_params["model"] != self.model:
            missing = ApiError(404, f"the model {request.path_params['model']!r} does not exist here",
                               code="model_not_found")
            return JSONResponse(missing.body(), 404)
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model})

    async def metrics_text(self, request: Request) -> Response:
        # In a thread: the bundled runner's engine statistics wait on the engine's lock.
        text = await asyncio.to_thread(self.metrics.render)
        return Response(text, media_type=CONTENT_TYPE)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing errors (404, 405) as OpenAI-style JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    path = request.url.path
    message = f"no route {request.method} {path}" if status in (404, 405) else "the gateway failed to answer"
    if status == 404 and path != "/" and path.endswith("/") and path.rstrip("/") in _ENDPOINTS:
        message += f" (the route is {path.rstrip('/')}, without the last '/')"
    error = ApiError(status, message, code=code, type="invalid_request_error" if status < 500 else "api_error")
    return JSONResponse(error.body(), status, getattr(exc, "headers", None))


def create_app(
    guard: Guard,
    *,
    keys: KeyFile | None = None,
    model: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    threads: int = DEFAULT_THREADS,
    close_guard: bool = False,
) -> Starlette:
    """The gateway's ASGI app over ``guard``.

    ``keys`` maps bearer keys to users (``None``: open, the user is the request's
    ``user`` field). ``model`` is the name clients ask for (default: the guard's
    model). Its lifespan loads the model (``guard.warmup()``), gives the event loop
    ``threads`` worker threads for the guard's blocking steps, registers the gateway's
    metrics as a meter observer of the guard, and at shutdown removes it and, with
    ``close_guard``, closes the guard.
    """
    metrics = Metrics(_engine_stats(guard))
    gateway = Gateway(guard, keys=keys, model=model or guard.model, metrics=metrics, max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenguard-serve"))
        await asyncio.to_thread(guard.warmup)
        guard.meter.observers.append(metrics.observe_call)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                guard.meter.observers.remove(metrics.observe_call)
            if close_guard:
                await asyncio.to_thread(guard.close)

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.one_model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Measured, metrics=metrics)],
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
        lifespan=lifespan,
    )
    # A route with an extra "/" is a 404 that names the route, not Starlette's empty 307
    # (a client that followed it would send its POST twice, or not at all).
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    app.state.metrics = metrics
    return app
