"""Guarded streams: iterate text pieces; ``.reply`` holds the final :class:`Reply`.

Both streams are thin shells around one :class:`~tokenguard.pipeline.generate.Generation`:
they pull the backend's chunks (with ``next`` or ``await anext``), feed them to it,
close the backend when it says stop, and hand its :class:`Outcome` to ``on_end`` exactly
once: at the end, on an error, on ``close()``, or when an abandoned stream is collected.
The async stream does every blocking step (opening: admission, budgets, a model's
first load; ending: the ledger and the budgets' settlement) in a worker thread, so
the event loop never waits on SQLite or on a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from tokenguard.accounting import Reply
from tokenguard.backends import Chunk
from tokenguard.backends.base import CALL_STEPS
from tokenguard.pipeline.generate import Generation, Outcome

__all__ = ["AsyncGuardStream", "GuardStream", "Opened"]

_DONE: Any = object()
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Opened:
    """A call the guard has started: the backend's chunks, the generation that watches
    them and the callback that ends the call; or, for an answer that needed no
    backend (a cache hit), the finished ``reply``."""

    request_id: str
    chunks: Any = None
    generation: Generation | None = None
    on_end: Callable[[Outcome], Reply] | None = None
    reply: Reply | None = None


class _Stream:
    """What both streams share: the generation, the end callback and the final reply."""

    def __init__(self, opened: Opened) -> None:
        self._adopt(opened)

    def _adopt(self, opened: Opened) -> None:
        self.request_id = opened.request_id
        self._chunks = opened.chunks
        self._generation = opened.generation
        self._on_end = opened.on_end
        #: The final reply, set once the stream has ended (at once for a cache hit).
        self.reply: Reply | None = opened.reply
        self._hit_text = opened.reply.text if opened.reply is not None and opened.reply.text else None

    def _replay(self) -> str | None:
        """The text of an already whole reply, the first time only."""
        text, self._hit_text = self._hit_text, None
        return text

    def _end(self, error: BaseException | None = None, *, cancelled: bool = False) -> None:
        """End the call, once: ``on_end`` is not run again should it fail (a ledger that
        cannot be written), so a later ``close()`` neither meters nor settles it twice."""
        generation, self._generation = self._generation, None
        if self.reply is None and generation is not None:  # else: never started, or ended
            assert self._on_end is not None
            self.reply = self._on_end(generation.outcome(error, cancelled=cancelled))

    def __del__(self) -> None:
        # An abandoned stream still leaves its ledger row and frees its reservation.
        if getattr(self, "reply", True) is None:
            with contextlib.suppress(Exception):  # nothing to report to at collection time
                self._end(cancelled=True)


class GuardStream(_Stream):
    """Text pieces of a guarded call, in order. Iterate it to the end (or ``close()`` it,
    or use it as a context manager); then ``.reply`` holds the :class:`Reply`."""

    _chunks: Iterator[Chunk] | None

    def __iter__(self) -> GuardStream:
        return self

    def __next__(self) -> str:
        if self.reply is not None or self._generation is None:
            text = self._replay()
            if text is None:
                raise StopIteration
            return text
        assert self._chunks is not None
        generation = self._generation
        generation.asked = True
        try:
            while not generation.stopped:
                chunk = next(self._chunks, _DONE)
                if chunk is _DONE:
                    break
                text = generation.feed(chunk)
                if generation.stopped:
                    self._close_backend()  # stop generating at once, not on the next call
                if text:
                    return text
        except BaseException as error:
            try:
                self._close_backend()
            finally:
                self._end(error)
            raise
        self._close_backend()
        self._end()
        raise StopIteration

    def read(self) -> Reply:
        """Read the rest of the stream; the final :class:`Reply`."""
        for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    def _close_backend(self) -> None:
        chunks, self._chunks = self._chunks, iter(())
        close = getattr(chunks, "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        """Stop early: close the backend's stream; the call is metered as cancelled."""
        if self.reply is None:
            try:
                self._close_backend()
            finally:
                self._end(cancelled=True)

    def __enter__(self) -> GuardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGuardStream(_Stream):
    """The async twin of :class:`GuardStream`: ``async for piece in guard.astream(...)``.

    The guard opens it on first iteration, in a worker thread, so refusals
    (:class:`~tokenguard.InputTooLong`, :class:`~tokenguard.BudgetExceeded`) are raised
    by the first ``anext``; it ends the call there too. ``inline=True`` does both on the
    event loop, for a call whose steps cannot wait (``Guard.can_run_inline``).
    """

    _chunks: AsyncIterator[Chunk] | None

    def __init__(self, opened: Opened | Callable[[], Opened], *, inline: bool = False) -> None:
        self._inline = inline
        self._open: Callable[[], Opened] | None = None
        if isinstance(opened, Opened):
            super().__init__(opened)
        else:
            super().__init__(Opened(""))
            self._open = opened

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        if self._open is not None:
            open_, self._open = self._open, None
            if self._inline:
                self._adopt(open_())
            else:
                await self._open_in_thread(open_)  # adopted there, as it opens
        if self.reply is not None or self._generation is None:
            text = self._replay()
            if text is None:
                raise StopAsyncIteration
            return text
        assert self._chunks is not None
        generation = self._generation
        generation.asked = True
        try:
            while not generation.stopped:
                chunk = await anext(self._chunks, _DONE)
                if chunk is _DONE:
                    break
                text = generation.feed(chunk)
                if generation.stopped:
                    await self._close_backend()
                if text:
                    return text
        except BaseException as error:
            try:
                await self._close_backend()
            finally:
                await self._aend(error)
            raise
        await self._close_backend()
        await self._aend()
        raise StopAsyncIteration

    async def _open_in_thread(self, open_: Callable[[], Opened]) -> None:
        """Open the call in a thread of CALL_STEPS, which adopts it into this stream as
        it opens (so a stream dropped unread, its loop gone, still ends it when
        collected). A caller cancelled meanwhile leaves the opening running: what it
        opens (a budget hold) is then ended as cancelled, by that thread or here,
        whichever comes second, or by that thread when the event loop has closed."""
        lock = threading.Lock()
        state = {"left": False, "opened": False}

        def open_here() -> None:
            opened = open_()
            with lock:
                self._adopt(opened)
                left, state["opened"] = state["left"], True
            if left:
                self._end_unread()

        def undelivered(_: None) -> None:  # its loop closed: nobody reads it, nothing else ends it
            with lock:
                left, state["left"] = state["left"], True
            if not left:  # else ended already, by open_here or by the cancelled caller
                self._end_unread()

        try:
            await _in_own_thread(open_here, undelivered=undelivered)
        except asyncio.CancelledError:
            with lock:
                state["left"] = True
                opened = state["opened"]
            if opened:  # opened, but the caller has left: end it off the loop
                CALL_STEPS.submit(contextvars.copy_context().run, self._end_unread)
            raise

    def _end_unread(self) -> None:
        """End, as cancelled, the call opened for a caller that has left; the backend was
        never asked (a refusal was metered by the guard already)."""
        self._chunks = None  # an async stream never started: nothing runs to be closed
        self._end(cancelled=True)

    async def _aend(self, error: BaseException | None = None, *, cancelled: bool = False) -> None:
        """End the call: off the event loop (the ledger and the budgets may wait on
        SQLite) unless the stream is inline, in a thread of CALL_STEPS that a cancelled
        caller does not stop (nor a busy thread pool delay): the call always ends."""
        if self.reply is not None:
            return
        if self._inline:
            self._end(error, cancelled=cancelled)
        else:
            await _in_own_thread(lambda: self._end(error, cancelled=cancelled))

    async def aread(self) -> Reply:
        """Read the rest of the stream; the final :class:`Reply`."""
        async for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    async def _close_backend(self) -> None:
        chunks, self._chunks = self._chunks, _empty()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def aclose(self) -> None:
        """Stop early: close the backend's stream; the call is metered as cancelled."""
        self._open = None  # never opened: nothing was started, nothing to record
        if self.reply is None:
            try:
                await self._close_backend()
            finally:
                await self._aend(cancelled=True)

    async def __aenter__(self) -> AsyncGuardStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _in_own_thread(work: Callable[[], _T], undelivered: Callable[[_T], object] | None = None) -> _T:
    """``work()`` in a thread of :data:`~tokenguard.backends.base.CALL_STEPS`, in a copy
    of the caller's context (as ``asyncio.to_thread``): unlike the default executor's
    queue (which the application may fill), it is not cancelled with its caller, and
    the interpreter waits for it at exit. The caller's cancellation still reaches the
    caller at once."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()
    done.add_done_callback(_retrieved)  # a caller that left does not read it: no "never retrieved" noise
    context = contextvars.copy_context()  # as asyncio.to_thread: the call tree goes along

    def settle(result: _T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = context.run(work), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed meanwhile: nobody waits, and what it made is left to end
            if undelivered is not None and error is None:
                context.run(undelivered, result)  # type: ignore[arg-type]

    CALL_STEPS.submit(run)
    return await asyncio.shield(done)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
