"""A time limit on a backend's stream, for the backend that hangs."""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from tokenguard.backends.base import wait_until_asked
from tokenguard.errors import BackendTimeout

__all__ = ["with_deadline"]

T = TypeVar("T")
_in_this_task: Any = getattr(asyncio, "timeout", None)  # Python 3.11+
_DONE: Any = object()
_POLL_S = 0.05  # how often a blocked worker checks whether the stream was closed


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _expired(timeout: float) -> BackendTimeout:
    return BackendTimeout(f"the backend did not finish within the guard's timeout of {timeout:g} s")


class _Pump:
    """What a deadline iterator's worker shares with its reader, and nothing more: the
    worker must not hold the iterator, or one dropped unclosed would never be collected
    (and its worker would keep the backend's stream open for good)."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.asks = threading.Semaphore(0)  # one release per item the reader waits for
        self.closed = threading.Event()

    def run(self, chunks: Iterator[Any]) -> None:
        try:
            while wait_until_asked(self.asks, self.closed.is_set, _POLL_S):
                chunk = next(chunks, _DONE)
                self.items.put(chunk)
                if chunk is _DONE:
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the reader, which raises it
            self.items.put(_Failed(error))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


class _DeadlineIterator(Iterator[T]):
    """Steps ``chunks`` in a worker thread and waits for each step at most as long as
    the timeout has left: a ``next`` that blocks for ever cannot be interrupted in its
    own thread. The timeout counts the time the reader waits for the backend, not the
    reader's own time between steps (as the async twin). The worker starts at the first
    step and pulls a chunk only when the reader asks for it, so a stream that is closed
    (or dropped, or never read) does not go on generating. Once the stream ends or is
    closed, the worker closes the backend's stream itself (a generator can only be
    closed by the thread that may be running it); a worker stuck in a backend that never
    answers is a daemon thread and leaves with the process."""

    def __init__(self, chunks: Iterator[T], timeout: float) -> None:
        self._timeout = timeout
        self._left = timeout
        self._pump = _Pump()
        self._chunks: Iterator[T] | None = chunks  # until the worker takes it, at the first step

    def __next__(self) -> T:
        pump = self._pump
        if self._chunks is not None:
            chunks, self._chunks = self._chunks, None
            if pump.closed.is_set():
                raise StopIteration
            # In a copy of the caller's context, as without a deadline: its context variables
            # (a request id, an OpenTelemetry context) reach the backend.
            threading.Thread(target=contextvars.copy_context().run, args=(pump.run, chunks), name="tokenguard-deadline",
                             daemon=True).start()
        started = time.monotonic()
        pump.asks.release()
        try:
            item = pump.items.get(timeout=max(self._left, 0.0))
        except queue.Empty:
            self.close()
            raise _expired(self._timeout) from None
        finally:
            self._left -= time.monotonic() - started
        if item is _DONE:
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._pump.closed.set()
        chunks, self._chunks = self._chunks, None
        close = getattr(chunks, "close", None)  # never started: no worker runs it, close it here
        if close is not None:
            close()

    def __del__(self) -> None:
        self._pump.closed.set()  # dropped unclosed: the worker stops and closes the backend's stream


class _AsyncDeadlineIterator(AsyncIterator[T]):
    """Awaits each step of ``chunks`` at most as long as the timeout has left (the time
    spent waiting for steps, not the reader's own); on expiry the step is cancelled,
    which an async backend handles as a closed stream."""

    def __init__(self, chunks: AsyncIterator[T], timeout: float) -> None:
        self._chunks = chunks
        self._timeout = timeout
        self._left = timeout  # the time the reader may still wait for the backend

    async def __anext__(self) -> T:
        started = time.monotonic()
        try:
            return await self._step(max(self._left, 0.0))
        finally:
            self._left -= time.monotonic() - started

    async def _step(self, left: float) -> T:
        if _in_this_task is None:  # Python 3.10: wait_for runs the step in a task of its own
            try:
                return await asyncio.wait_for(anext(self._chunks), left)
            except asyncio.TimeoutError:
                raise _expired(self._timeout) from None
        # In this task: a backend's own asyncio.timeout (or anyio scope) held across its
        # yields must see every step run in the one task it was entered in.
        deadline = _in_this_task(left)
        try:
            async with deadline:
                return await anext(self._chunks)
        except TimeoutError:
            if deadline.expired():
                raise _expired(self._timeout) from None
            raise  # the backend's own timeout, not the guard's

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def with_deadline(chunks: Iterator[T] | AsyncIterator[T], timeout: float) -> Iterator[T] | AsyncIterator[T]:
    """``chunks``, ended with :class:`~tokenguard.BackendTimeout` once the reader has
    waited ``timeout`` seconds in all for the backend's steps, before its last."""
    if isinstance(chunks, AsyncIterator):
        return _AsyncDeadlineIterator(chunks, timeout)
    return _DeadlineIterator(chunks, timeout)
