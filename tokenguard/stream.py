"""Guarded streams: iterate text pieces; ``.reply`` holds the final :class:`Reply`.

The stream owns the generate step: it feeds the backend's chunks through an
:class:`~tokenguard.generation.OutputCap`, closes the backend when the cap is reached,
and hands the outcome to the guard (meter, settle, remember) exactly once: at the end,
on an error, on ``close()``, or when an abandoned stream is collected.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from tokenguard.generation import OutputCap
from tokenguard.usage import Reply

if TYPE_CHECKING:
    from tokenguard.backends.base import Chunk
    from tokenguard.call import Call
    from tokenguard.guard import Guard

__all__ = ["AsyncGuardStream", "GuardStream"]

_DONE: Any = object()
_CANCEL_ERRORS = (KeyboardInterrupt, GeneratorExit, asyncio.CancelledError)


class _Base:
    def __init__(self, guard: Guard, call: Call, chunks: Any, reply: Reply | None = None) -> None:
        self._guard = guard
        self._call = call
        self._chunks = chunks
        self._cap = OutputCap(call.tokenizer, call.max_output_tokens)
        #: The final reply, set once the stream has ended (at once for a cache hit).
        self.reply: Reply | None = reply
        self._hit_text = reply.text if reply is not None and reply.text else None

    @property
    def request_id(self) -> str:
        return self._call.request_id

    def _finish(self, error: BaseException | None = None, cancelled: bool = False) -> None:
        if self.reply is None:
            self.reply = self._guard._after(self._call, self._cap, error, cancelled)

    def __del__(self) -> None:
        # An abandoned stream still leaves its ledger row and frees its reservation.
        if getattr(self, "reply", True) is None:
            try:
                self._finish(cancelled=True)
            except Exception:  # noqa: BLE001 - nothing to report to at collection time
                pass


class GuardStream(_Base):
    """Text pieces of a guarded call, in order. Iterate it to the end (or ``close()`` it,
    or use it as a context manager); then ``.reply`` holds the :class:`Reply`."""

    _chunks: Iterator[Chunk] | None

    def __iter__(self) -> GuardStream:
        return self

    def __next__(self) -> str:
        if self.reply is not None:
            if self._hit_text is not None:
                text, self._hit_text = self._hit_text, None
                return text
            raise StopIteration
        assert self._chunks is not None
        try:
            while not self._cap.cut:
                chunk = next(self._chunks, _DONE)
                if chunk is _DONE:
                    break
                text = self._cap.feed(chunk)
                if self._cap.cut:
                    self._close_backend()  # stop generating at once, not on the next call
                if text:
                    return text
        except BaseException as error:
            try:
                self._close_backend()
            finally:
                self._finish(error, isinstance(error, _CANCEL_ERRORS))
            raise
        self._close_backend()
        self._finish()
        raise StopIteration

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
                self._finish(cancelled=True)

    def __enter__(self) -> GuardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGuardStream(_Base):
    """The async twin of :class:`GuardStream`: ``async for piece in guard.astream(...)``."""

    _chunks: AsyncIterator[Chunk] | None

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        if self.reply is not None:
            if self._hit_text is not None:
                text, self._hit_text = self._hit_text, None
                return text
            raise StopAsyncIteration
        assert self._chunks is not None
        try:
            while not self._cap.cut:
                chunk = await anext(self._chunks, _DONE)
                if chunk is _DONE:
                    break
                text = self._cap.feed(chunk)
                if self._cap.cut:
                    await self._close_backend()
                if text:
                    return text
        except BaseException as error:
            try:
                await self._close_backend()
            finally:
                self._finish(error, isinstance(error, _CANCEL_ERRORS))
            raise
        await self._close_backend()
        self._finish()
        raise StopAsyncIteration

    async def _close_backend(self) -> None:
        chunks, self._chunks = self._chunks, _empty()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def aclose(self) -> None:
        """Stop early: close the backend's stream; the call is metered as cancelled."""
        if self.reply is None:
            try:
                await self._close_backend()
            finally:
                self._finish(cancelled=True)

    async def __aenter__(self) -> AsyncGuardStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator
