"""The :class:`Backend` protocol: what the guard needs from anything that generates text.

A backend is a transport (like an httpx transport): one streaming method and its async
twin. It yields :class:`Chunk` objects, text pieces first and, when the backend knows
it, a final chunk carrying :class:`BackendUsage` and the finish reason. The guard does
the policy: counting, caps, budgets and the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
import numbers
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from tokenguard.errors import TokenGuardError

if TYPE_CHECKING:
    from tokenguard.tokens import Message, Tokenizer

__all__ = ["Backend", "BackendUsage", "Chunk", "Params", "aiter_in_thread", "iter_async"]

T = TypeVar("T")

Params = dict[str, Any]
"""Generation parameters; the guard always sets ``max_tokens``."""


@dataclass(frozen=True, slots=True)
class BackendUsage:
    """Token counts a backend reported itself (e.g. an API's ``usage``). ``None`` where
    it did not say; ``input_tokens`` includes ``cached_input_tokens``.

    A count that is no whole number >= 0 (negative, NaN, text) is taken as not said:
    the guard counts for itself rather than bill it; numpy's integers and whole floats
    become ints, and cached tokens are capped at the prompt."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None

    def __post_init__(self) -> None:
        counts = [reported_count(n) for n in (self.input_tokens, self.output_tokens, self.cached_input_tokens)]
        if counts[0] is not None and counts[2] is not None:
            counts[2] = min(counts[2], counts[0])  # cached prompt tokens are part of the prompt
        for name, count in zip(("input_tokens", "output_tokens", "cached_input_tokens"), counts, strict=True):
            object.__setattr__(self, name, count)


def reported_count(value: object) -> int | None:
    """A token count a backend reported, as an int, or ``None`` when it is none (or
    beyond any call's size: a ledger could not even store it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        count = int(value)
    else:
        number = float(value)
        if not (0 <= number < math.inf and number.is_integer()):
            return None
        count = int(number)
    return count if 0 <= count <= _MOST_TOKENS else None


# No call reads or writes more tokens (a context window of a billion tokens is far off).
_MOST_TOKENS = 10**12


@dataclass(slots=True)
class Chunk:
    """One step of a backend's stream: a text piece, and/or the end of it."""

    text: str = ""
    #: ``"stop"``, ``"length"`` or the backend's own reason; set on the last chunk.
    finish_reason: str | None = None
    #: The counts the backend reported so far: a later chunk's replace an earlier one's
    #: (the bundled runner sends the prompt's with its first piece, all of them at the end).
    usage: BackendUsage | None = None
    #: The chunk holds tool calls (the answer calls tools, whatever its finish reason says).
    calls_tools: bool = False
    #: The text of tool calls not given as ``tool_calls`` (function names and arguments,
    #: such as the legacy ``function_call``'s): generated, so metered when the backend
    #: reports no usage, though it is no part of the reply's text. The guard meters
    #: ``tool_calls`` from the calls themselves.
    tool_text: str = ""
    #: The tool calls themselves, in OpenAI's shape (``id``, ``type``, ``function`` with its
    #: ``name`` and ``arguments``), each with its ``index`` where the server gave one: a
    #: whole answer's calls, or a stream's parts of them (the guard joins the parts).
    tool_calls: tuple[dict[str, Any], ...] = ()


@runtime_checkable
class Backend(Protocol):
    """Anything that turns messages into a stream of :class:`Chunk`.

    ``name`` is the backend's kind for the ledger (``"function"``, ``"openai"``, ...);
    ``model`` the model it runs (``None`` when it cannot know, as for a plain function).
    A closed stream must stop generating and free what it holds.

    What a backend may offer beyond the two streams is declared here with defaults;
    subclass :class:`Backend` to inherit them (a backend that does not subclass it must
    set every attribute itself):

    - ``accepts_session``: the backend keeps per-session state (the bundled runner keeps
      a chat session's KV cache between turns), so the guard passes the call's session
      as ``params["session"]``.
    - ``accepts_user``: the backend takes the call's end user (a function with a
      ``user`` parameter, as OpenAI's ``create`` has), passed as ``params["user"]``.
    - ``is_async``: the backend's own work is async; the guard's async methods are its
      natural path (a sync call runs it on a private event loop).
    - :meth:`tokenizer`: the tokenizer whose counts match the backend.
    - :meth:`warmup`: load what the first call would otherwise pay for.
    - ``greedy_by_default``: a request that sets no ``temperature`` decodes greedily
      (the same answer every time), so a cache may keep it.
    - :meth:`cache_identity`: what, besides the request, decides the answer.
    - :meth:`check_params`, :meth:`touch_session`: refuse what it cannot take, keep a
      session alive (newer: the guard does without them on a backend that lacks them).
    """

    name: str
    model: str | None
    accepts_session: bool = False
    accepts_user: bool = False
    is_async: bool = False
    greedy_by_default: bool = False

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer whose counts match this backend, or ``None`` (the default) to
        let the guard use the one named by ``Guard(model=...)``."""
        return None

    def warmup(self) -> None:
        """Load and prepare what the first call would otherwise pay for (a model's
        weights); the guard calls it before it starts timing a call, so load time stays
        out of call latency. Default: nothing."""
        return None

    def end_session(self, session: str) -> None:
        """Free what the backend keeps for ``session`` (the bundled runner's KV
        blocks) now. Default: nothing is kept, nothing to free."""
        return None

    def check_params(self, params: Params) -> None:
        """Raise :class:`~tokenguard.InvalidRequest` for a parameter the backend cannot
        take, before the call is admitted. Default: it passes them all on."""
        return None

    def touch_session(self, session: str) -> None:
        """Keep what the backend keeps for ``session`` alive (a heartbeat). Default:
        nothing is kept."""
        return None

    def cache_identity(self) -> object:
        """JSON-able data that, with the messages and parameters, decides the answer:
        a cache never serves one backend's answer to a call on another. Default: the
        backend's kind and model."""
        return [self.name, self.model]

    def context_window(self) -> int | None:
        """How many tokens the model reads and writes in one call (prompt and reply),
        or ``None`` (the default) when the backend cannot tell."""
        return None

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        """Generate a reply to ``messages`` with ``params`` (``max_tokens`` always set)."""
        ...

    def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        """The async twin of :meth:`stream`."""
        ...


_END = object()


class StreamThreads:
    """Threads for blocking backends' streams: one for each stream running, however
    many run (a stream holds its thread while its reader is away, and a reader may wait
    on another stream: any fixed number of threads can all be held so, and every stream
    then waits for ever); a thread that is free takes the next stream (starting one costs
    150 us), and one idle for ``idle_s`` ends. Daemon threads: a backend that hangs does
    not keep the process from exiting."""

    def __init__(self, name: str, idle_s: float = 30.0) -> None:
        self.name = name
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job()`` in a free thread, or a new one."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._work, args=(job,), name=self.name, daemon=True).start()

    def _work(self, job: Callable[[], object] | None) -> None:
        while job is not None:
            job()  # a job hands its own errors on
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:  # a job handed over as the wait ended is this thread's still
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        job = None


# Threads of tokenguard's own, not the default executor (which the application may
# fill, and which has few workers): the opening and ending of async calls (short, and
# they must finish: the interpreter waits for them at exit), started once and reused;
# and blocking backends' streams (as long as the stream).
CALL_STEPS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tokenguard-call")
BACKEND_STREAMS = StreamThreads("tokenguard-backend")


def wait_until_asked(asks: threading.Semaphore, stopped: Callable[[], bool], poll_s: float = 0.05) -> bool:
    """In a worker that makes items only when its reader asks: wait for the next ask
    (one release of ``asks``), looking every ``poll_s`` whether the reader has gone;
    False once ``stopped()``."""
    while not asks.acquire(timeout=poll_s):
        if stopped():
            return False
    return not stopped()


async def aiter_in_thread(make: Callable[[], Iterator[T]], *, buffer: int = 1) -> AsyncIterator[T]:
    """Run a blocking iterator in a thread of :data:`BACKEND_STREAMS` and yield its items
    on the event loop, the thread at most ``buffer`` items ahead (a stream closed early
    does not go on generating).

    Closing the async iterator asks the worker to stop after its current item and close
    the blocking iterator there (generators are closed in the thread that runs them).
    The worker runs in a copy of the caller's context (as ``asyncio.to_thread`` does),
    so context variables, such as the guard's call tree, reach the blocking code. It is
    not one of the default executor's few: a stream holds it for as long as it runs, and
    concurrent calls must not queue behind each other.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    room = threading.Semaphore(buffer)
    stop = threading.Event()

    def put(item: object, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            stop.set()

    def run() -> None:
        iterator = None
        try:
            iterator = make()
            # asked for before it is made: at most `buffer` ahead (none once the reader left or its loop closed)
            while wait_until_asked(room, lambda: stop.is_set() or loop.is_closed()):
                item = next(iterator, _END)
                if item is _END:
                    break
                put(item)
            else:
                return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(_END, error)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        put(_END)

    BACKEND_STREAMS.submit(functools.partial(contextvars.copy_context().run, run))
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            room.release()
            yield item  # type: ignore[misc]
    finally:
        stop.set()


def iter_async(agen: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator from sync code on a private event loop.

    For a sync call of a backend built on async code; inside a running event loop use
    the async API instead. Every step runs in one task, as ``async for`` would run it
    (a backend's ``asyncio.timeout`` held across its yields needs that), and only when
    the reader asks for it; leaving early closes the iterator in that task.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise TokenGuardError("this backend is async; inside an event loop use the guard's async methods")
    loop = asyncio.new_event_loop()
    asks: asyncio.Queue[bool] = asyncio.Queue()
    answers: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

    async def pump() -> None:
        aclose = getattr(agen, "aclose", None)
        try:
            while await asks.get():
                try:
                    item = await anext(agen)
                except StopAsyncIteration:
                    answers.put_nowait((_END, None))
                    return
                except BaseException as error:  # noqa: BLE001 - handed to the reader
                    answers.put_nowait((_END, error))
                    return
                answers.put_nowait((item, None))
        finally:
            if aclose is not None:
                await aclose()

    task = loop.create_task(pump())
    stepping = False  # a step is running: leaving now (Ctrl-C) must not wait for it
    try:
        while True:
            asks.put_nowait(True)
            stepping = True
            item, error = loop.run_until_complete(answers.get())
            stepping = False
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        try:
            if stepping:
                task.cancel()
            else:
                asks.put_nowait(False)
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
            loop.run_until_complete(loop.shutdown_asyncgens())  # any the backend left open
        finally:
            loop.close()
