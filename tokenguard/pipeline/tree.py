"""The call tree: which guarded call is running here, and in which scope.

A :class:`Frame` in a :mod:`contextvars` variable says where code runs: the innermost
:func:`scope` (its name and limits) and the guarded call whose backend is running, if
any. The guard sets a call's frame only while its backend runs (for ``@guard``, the
decorated function: where nested calls are made), and takes it away again however the
call ends, so a guarded call made there is that call's child and a call made anywhere
else is not.

Context variables follow the code that a call starts: into asyncio tasks (a task starts
with a copy of its creator's context, so ``asyncio.gather`` and ``create_task`` make
children), into ``asyncio.to_thread``, and into work run with
``contextvars.copy_context().run`` (``executor.submit(copy_context().run, fn, ...)``).
A plain ``threading.Thread`` or ``executor.submit(fn)`` starts with an empty context:
a call made there is a root call.
"""

from __future__ import annotations

import contextvars
import operator
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tokenguard.context import fingerprint
from tokenguard.errors import ConfigError, TokenGuardError

if TYPE_CHECKING:
    from tokenguard.pipeline.call import Call

__all__ = ["DEFAULT_SHARE", "Frame", "Scope", "current_frame", "framed", "running_frame", "scope"]

T = TypeVar("T")

#: The share of its parent's input a nested call may take by default: a chain in which
#: each level forwards everything it received costs at most 1 + 1/4 + 1/16 + ... < 4/3
#: times the root's input (see :class:`~tokenguard.pipeline.TrimForwarded`).
DEFAULT_SHARE = 0.25

_CURRENT: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("tokenguard_frame", default=None)


class Frame:
    """Where code runs in a call tree.

    The scope part: ``name``, ``max_input_tokens`` and ``share`` of the innermost
    :func:`scope` (inherited by every call below it; ``None``, ``None`` and
    :data:`DEFAULT_SHARE` outside any). The call part: the running guarded call's
    ``depth``, ``request_id``, the ``root_id`` of its tree and its exact
    ``input_tokens``; ``depth`` is -1 and the rest ``None`` where no call runs (a scope
    entered at the top level). :attr:`sent` holds the fingerprints of every message
    the running call and its ancestors were sent.
    """

    __slots__ = (
        "_messages",
        "_sent",
        "depth",
        "input_tokens",
        "max_input_tokens",
        "name",
        "outer",
        "owner",
        "request_id",
        "root_id",
        "share",
    )

    def __init__(
        self,
        *,
        name: str | None = None,
        max_input_tokens: int | None = None,
        share: float = DEFAULT_SHARE,
        depth: int = -1,
        request_id: str | None = None,
        root_id: str | None = None,
        input_tokens: int | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] = (),
        outer: Frame | None = None,
        owner: object = None,
    ) -> None:
        self.name = name
        self.max_input_tokens = max_input_tokens
        self.share = share
        self.depth = depth
        self.request_id = request_id
        self.root_id = root_id
        self.input_tokens = input_tokens
        #: The frame this one was entered in.
        self.outer = outer
        #: The :class:`Scope` that entered this frame (``None`` for a call's frame).
        self.owner = owner
        self._messages = messages
        self._sent: frozenset[str] | None = None

    @property
    def sent(self) -> frozenset[str]:
        """Fingerprints (:func:`~tokenguard.context.fingerprint`) of the messages the
        running call and its ancestors were sent; computed when a child first asks."""
        if self._sent is None:  # two children may race here: both compute the same set
            inherited = self.outer.sent if self.outer is not None else frozenset()
            own = {fingerprint(message) for messages in self._messages for message in messages}
            self._sent = inherited | own if own else inherited
        return self._sent

    def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` with this frame current; the frame before it is restored after."""
        token = _CURRENT.set(self)
        try:
            return fn(*args)
        finally:
            _CURRENT.reset(token)

    def __repr__(self) -> str:
        return f"Frame(name={self.name!r}, depth={self.depth}, request_id={self.request_id!r})"


def current_frame() -> Frame | None:
    """The frame code runs in here, or ``None`` outside every call and scope."""
    return _CURRENT.get()


def running_frame(call: Call, *sent: Sequence[Mapping[str, Any]]) -> Frame:
    """The frame ``call``'s backend runs in, for the calls it makes: the scope it was
    made in, its own place in the tree, its exact input, and ``sent`` (the message
    lists it was given and sends) added to what its ancestors sent."""
    outer = call.outer
    return Frame(
        name=outer.name if outer is not None else None,
        max_input_tokens=outer.max_input_tokens if outer is not None else None,
        share=outer.share if outer is not None else DEFAULT_SHARE,
        depth=call.depth,
        request_id=call.request_id,
        root_id=call.root_id,
        input_tokens=call.input_tokens,
        messages=sent,
        outer=outer,
    )


class _Framed:
    """A backend's chunk iterator whose every step runs in a call's frame.

    Each step starts from the frame the step before it ended in, so a scope the backend
    (a guarded generator) entered and holds across a ``yield`` is still current when it
    resumes; the caller's own frame is back after each step."""

    __slots__ = ("_frame", "_inner")

    def __init__(self, frame: Frame, inner: Any) -> None:
        self._frame: Frame | None = frame
        self._inner = inner


class _FramedIterator(_Framed):
    __slots__ = ()

    def __iter__(self) -> _FramedIterator:
        return self

    def __next__(self) -> Any:
        return self._step(next, self._inner)

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            self._step(close)

    def _step(self, fn: Callable[..., T], /, *args: Any) -> T:
        token = _CURRENT.set(self._frame)
        try:
            return fn(*args)
        finally:
            self._frame = _CURRENT.get()
            _CURRENT.reset(token)


class _FramedAsyncIterator(_Framed):
    __slots__ = ()

    # Each step sets the frame and takes it away in the task that awaits it, so the
    # frame is never left behind in the caller's context between pieces.
    def __aiter__(self) -> _FramedAsyncIterator:
        return self

    async def __anext__(self) -> Any:
        token = _CURRENT.set(self._frame)
        try:
            return await anext(self._inner)
        finally:
            self._frame = _CURRENT.get()
            _CURRENT.reset(token)

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is None:
            return
        token = _CURRENT.set(self._frame)
        try:
            await aclose()
        finally:
            self._frame = _CURRENT.get()
            _CURRENT.reset(token)


def framed(frame: Frame, open_chunks: Callable[[], Iterator[T] | AsyncIterator[T]]) -> Iterator[T] | AsyncIterator[T]:
    """Open a backend's stream in ``frame`` and step it there: whatever the backend
    runs (a guarded function and the guarded calls it makes) sees ``frame`` as current."""
    chunks = frame.run(open_chunks)
    if hasattr(chunks, "__anext__"):
        return _FramedAsyncIterator(frame, chunks)
    return _FramedIterator(frame, chunks)


class Scope:
    """An explicit scope: what :func:`scope` returns. Use it as ``with`` or
    ``async with``; entering gives its :class:`Frame`."""

    def __init__(self, name: str, max_input_tokens: int | None, share: float) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a scope's name is a non-empty string, got {name!r}")
        if max_input_tokens is not None:
            try:
                limit = operator.index(max_input_tokens)
            except TypeError:
                limit = -1
            if isinstance(max_input_tokens, bool) or limit < 0:
                raise ConfigError(f"max_input_tokens must be an integer >= 0 or None, got {max_input_tokens!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ConfigError(f"share must be a number from 0 to 1, got {share!r}")
        self.name = name
        self.max_input_tokens = max_input_tokens
        self.share = float(share)

    def __enter__(self) -> Frame:
        outer = _CURRENT.get()
        limits = [n for n in (self.max_input_tokens, outer.max_input_tokens if outer else None) if n is not None]
        frame = Frame(
            name=self.name,
            max_input_tokens=min(limits) if limits else None,  # an inner scope narrows, never widens
            share=self.share,
            depth=outer.depth if outer is not None else -1,
            request_id=outer.request_id if outer is not None else None,
            root_id=outer.root_id if outer is not None else None,
            input_tokens=outer.input_tokens if outer is not None else None,
            outer=outer,
            owner=self,
        )
        _CURRENT.set(frame)
        return frame

    def __exit__(self, *exc: object) -> None:
        # Back to the frame this scope was entered in. Checked rather than reset with a
        # token, so one Scope object may be entered by several tasks at once.
        frame = _CURRENT.get()
        if frame is None or frame.owner is not self:
            raise TokenGuardError(f"scope {self.name!r} is left where it was not entered (another task or thread?)")
        _CURRENT.set(frame.outer)

    async def __aenter__(self) -> Frame:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)

    def __repr__(self) -> str:
        return f"scope({self.name!r}, max_input_tokens={self.max_input_tokens!r}, share={self.share!r})"


def scope(name: str, max_input_tokens: int | None = None, share: float = DEFAULT_SHARE) -> Scope:
    """Name a part of the call tree and bound the calls in it, sync (``with``) or async
    (``async with``). Scopes nest: the innermost one's name and ``share`` apply, and
    ``max_input_tokens`` is the smallest of every scope around.

    Every guarded call made inside it, and every call nested below those, records
    ``name`` in its ledger row (``scope``). ``max_input_tokens`` bounds each call's
    input: the context it forwards is trimmed to fit, and a call whose own new
    messages alone are longer raises :class:`~tokenguard.InputTooLong`. ``share`` is
    the part of its parent's input a nested call may fill with forwarded context
    (default :data:`DEFAULT_SHARE`, 1/4: a chain in which each level forwards everything
    it received plus a task of its own costs less than 4/3 of its root's input, where
    without trimming it costs one root's worth per level). Guarded calls nest into a tree without any scope: a call
    made while another runs (same thread, asyncio tasks, threads started with
    ``contextvars.copy_context().run``) is its child.

    >>> import tokenguard as tg
    >>> with tg.scope("research", max_input_tokens=2_000) as frame:
    ...     frame.name, frame.max_input_tokens
    ('research', 2000)
    """
    return Scope(name, max_input_tokens, share)
