"""Run one guarded call as an HTTP answer, and stop it when the client leaves.

:class:`GuardedResponse` is the ASGI answer to a completion request. It reads the
guard's stream in a task of its own while another task waits for the client to hang
up (uvicorn says so only through ``receive()``: a ``send`` to a closed connection is
silently dropped). When the client leaves first, the call's task is cancelled: the
guard's stream closes the backend (the bundled runner frees the sequence's KV blocks,
an upstream's connection is closed) and meters the call as ``"cancelled"`` with the
tokens generated so far.

A refusal (budget, size) surfaces at the stream's first step, before any byte is
sent, so it is answered with its own status code and an OpenAI error body. After
an SSE stream has begun, a failure is one ``error`` event and the stream ends
without ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenguard._guard import Guard
from tokenguard.pipeline import Call
from tokenguard.serve.errors import ApiError, api_error
from tokenguard.serve.metrics import Metrics
from tokenguard.serve.parse import ParsedRequest
from tokenguard.serve.shapes import Answer, dumps

__all__ = ["GuardedResponse", "json_response"]

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
# How often a client that left while its call was being opened looks again (see _stop).
_OPENING_POLL_S = 0.002


def _headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


async def json_response(send: Send, status: int, body: object, headers: dict[str, str] | None = None) -> None:
    """Send a whole JSON answer."""
    data = dumps(body)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        *_headers((headers or {}).items())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _client_left(receive: Receive) -> None:
    """Return when the client hangs up (the request body was read before); a
    connection whose ``receive`` fails is gone too."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - whatever broke, the client cannot be answered
        return


class GuardedResponse(Response):
    """The answer to one completion request: JSON, or server-sent events when the
    request streams. ``prepare`` makes the call (``guard.prepare(...)``); the guard
    runs it, in a worker thread unless its steps cannot wait
    (``guard.can_run_inline``), when the answer starts. ``arrived`` is the request's
    ``perf_counter()`` arrival time (for the time to the first piece)."""

    def __init__(self, guard: Guard, prepare: Callable[[], Call], request: ParsedRequest, *, model: str,
                 metrics: Metrics, arrived: float) -> None:
        super().__init__()
        self._prepare = prepare
        #: The call, once prepared: its ``request_id`` names a refused call's ledger row too.
        self.call: Call | None = None
        self.stream = guard.open_astream(self._prepared, inline=guard.can_run_inline(request.messages))
        self.request = request
        self.model = model
        self.metrics = metrics
        self.arrived = arrived

    def _prepared(self) -> Call:
        self.call = self._prepare()
        return self.call

    @property
    def request_id(self) -> str | None:
        """The call's ledger ``request_id``, once it is prepared."""
        return self.call.request_id if self.call is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._answer(send))
        left = asyncio.ensure_future(_client_left(receive))
        try:
            await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await self._stop(work)
        finally:
            left.cancel()
            if not work.done():  # this task itself was cancelled (the server is stopping)
                work.cancel()
        error = None if work.cancelled() else work.exception()
        if error is not None:
            raise error

    async def _stop(self, work: asyncio.Future[None]) -> None:
        """The client left: cancel the call and wait until the guard has metered it.

        Not while the guard is still opening the stream: it does so in a worker thread
        inside the stream's first step, and a cancel delivered there would drop the
        opened call (its budget hold and its ledger row). The stream's ``request_id``
        is set once it is opened (or the work ends, on a refusal); opening takes
        milliseconds (admission, counting, the cache, the budget), so this waits that long.
        """
        while not self.stream.request_id and not work.done():
            await asyncio.sleep(_OPENING_POLL_S)
        work.cancel()
        await asyncio.wait((work,))

    async def _answer(self, send: Send) -> None:
        stream = self.stream
        try:
            first: str | None = await anext(stream)
        except StopAsyncIteration:
            first = None
        except Exception as error:  # noqa: BLE001 - refused before anything was generated: answered, not raised
            refusal = self._failure(error)
            headers = {**refusal.headers, **({"x-request-id": self.request_id} if self.request_id else {})}
            await json_response(send, refusal.status, refusal.body(), headers)
            return
        try:
            if self.request.stream:
                await self._events(send, first)
            else:
                await self._whole(send, first)
        finally:
            if stream.reply is None:  # cancelled while sending, outside the stream: end the call now
                await stream.aclose()

    def _failure(self, error: BaseException) -> ApiError:
        return api_error(error, request_id=self.request_id,
                         input_field="prompt" if self.request.kind == "text" else "messages")

    def _answer_shape(self) -> Answer:
        return Answer(self.request.kind, self.stream.request_id, self.model, int(time.time()))

    async def _events(self, send: Send, first: str | None) -> None:
        stream, answer = self.stream, self._answer_shape()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_SSE_HEADERS, (b"x-request-id", stream.request_id.encode())]})
        try:
            if first is not None:
                self.metrics.observe_first_piece(self.model, time.perf_counter() - self.arrived)
                await send({"type": "http.response.body", "body": answer.piece(first), "more_body": True})
                async for piece in stream:
                    await send({"type": "http.response.body", "body": answer.piece(piece), "more_body": True})
            assert stream.reply is not None  # the stream ended
            end = answer.end(stream.reply, self.request.include_usage)
        except Exception as error:  # noqa: BLE001 - the status is sent: the failure becomes an event
            failure = self._failure(error)
            await send({"type": "http.response.body", "body": answer.error_event(failure), "more_body": False})
            return
        await send({"type": "http.response.body", "body": end, "more_body": False})

    async def _whole(self, send: Send, first: str | None) -> None:
        stream = self.stream
        if first is not None:
            try:
                async for _ in stream:
                    pass
            except Exception as error:  # noqa: BLE001 - answered with its status
                failure = self._failure(error)
                await json_response(send, failure.status, failure.body(), {"x-request-id": stream.request_id})
                return
        assert stream.reply is not None
        await json_response(send, 200, self._answer_shape().whole(stream.reply), {"x-request-id": stream.request_id})
