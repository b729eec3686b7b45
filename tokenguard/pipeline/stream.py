"""Guarded streams: iterate text pieces; ``.reply`` holds the final :class:`Reply`.

Both streams are thin shells around one :class:`~tokenguard.pipeline.generate.Generation`:
they pull the backend's chunks (with ``next`` or ``await anext``), feed them to it,
close the backend when it says stop, and hand its :class:`Outcome` to ``on_end`` exactly
once: at the end, on an error, on ``close()``, or when an abandoned stream is collected.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from tokenguard.accounting import Reply
from tokenguard.backends import Chunk
from tokenguard.pipeline.generate import Generation, Outcome

__all__ = ["AsyncGuardStream", "GuardStream"]

_DONE: Any = object()
S = TypeVar("S", bound="_Stream")


class _Stream:
    """What both streams share: the generation, the end callback and the final reply."""

    def __init__(
        self,
        request_id: str,
        chunks: Any,
        generation: Generation | None,
        on_end: Callable[[Outcome], Reply] | None,
        reply: Reply | None = None,
    ) -> None:
        self.request_id = request_id
        self._chunks = chunks
        self._generation = generation
        self._on_end = on_end
        #: The final reply, set once the stream has ended (at once for a cache hit).
        self.reply: Reply | None = reply
        self._hit_text = reply.text if reply is not None and reply.text else None

    @classmethod
    def finished(cls: type[S], reply: Reply) -> S:
        """A stream of a reply that is already whole (a cache hit): its text, once."""
        return cls(reply.request_id, None, None, None, reply)

    def _replay(self) -> str | None:
        """The text of an already whole reply, the first time only."""
        text, self._hit_text = self._hit_text, None
        return text

    def _end(self, error: BaseException | None = None, *, cancelled: bool = False) -> None:
        if self.reply is None:
            assert self._generation is not None and self._on_end is not None
            self.reply = self._on_end(self._generation.outcome(error, cancelled=cancelled))

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
        if self.reply is not None:
            text = self._replay()
            if text is None:
                raise StopIteration
            return text
        assert self._chunks is not None and self._generation is not None
        generation = self._generation
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
    """The async twin of :class:`GuardStream`: ``async for piece in guard.astream(...)``."""

    _chunks: AsyncIterator[Chunk] | None

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        if self.reply is not None:
            text = self._replay()
            if text is None:
                raise StopAsyncIteration
            return text
        assert self._chunks is not None and self._generation is not None
        generation = self._generation
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
                self._end(error)
            raise
        await self._close_backend()
        self._end()
        raise StopAsyncIteration

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
        if self.reply is None:
            try:
                await self._close_backend()
            finally:
                self._end(cancelled=True)

    async def __aenter__(self) -> AsyncGuardStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator
