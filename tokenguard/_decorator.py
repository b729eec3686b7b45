"""``@guard``: put an existing model call behind a :class:`~tokenguard.Guard`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar, overload

from tokenguard._guard import Guard
from tokenguard.accounting import Reply
from tokenguard.backends import Function
from tokenguard.backends.openai_format import (
    chunk_from_completion,
    completion_from_cache,
    completion_with_text,
    is_completion,
)
from tokenguard.errors import ConfigError, InvalidRequest
from tokenguard.pipeline import AsyncGuardStream, Call, GuardStream

__all__ = ["Guarded", "guard", "reply_of"]

T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)
_REPLY = "__tokenguard_reply__"


class Guarded(Protocol[R_co]):
    """A ``@guard``-decorated function, as type checkers see it: called with the
    messages (or a prompt string), its own further arguments, and ``user=``,
    ``session=``, ``tags=``; it returns ``R_co``, what the function returns (see
    :func:`guard`). ``.guard`` is its :class:`~tokenguard.Guard`."""

    guard: Guard

    def __call__(
        self,
        prompt_or_messages: str | Sequence[Mapping[str, Any]],
        /,
        *args: Any,
        user: str | None = None,
        session: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> R_co: ...


class _Decorator(Protocol):
    """What ``guard(**options)`` returns: a decorator typed like :func:`guard`."""

    @overload
    def __call__(self, fn: Callable[..., AsyncIterator[Any]], /) -> Guarded[AsyncGuardStream]: ...
    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, T]], /) -> Guarded[Coroutine[Any, Any, T]]: ...
    @overload
    def __call__(self, fn: Callable[..., Generator[Any, Any, Any]], /) -> Guarded[GuardStream]: ...
    @overload
    def __call__(self, fn: Callable[..., Iterator[Any]], /) -> Guarded[GuardStream | Reply]: ...
    @overload
    def __call__(self, fn: Callable[..., T], /) -> Guarded[T]: ...


class _GuardedStr(str):
    """A ``str`` that carries the guard's reply (see :func:`reply_of`)."""

    __slots__ = (_REPLY,)


class _GuardedDict(dict[str, Any]):
    """A ``dict`` (a chat completion as JSON) that carries the guard's reply."""

    __slots__ = (_REPLY,)


def reply_of(result: Any) -> Reply:
    """The guard's :class:`~tokenguard.Reply` (usage, cost, stop reason, request id)
    for what a ``@guard``-decorated function returned.

    >>> @guard(model="gpt-4o")
    ... def ask(messages, max_tokens):
    ...     return "Paris"
    >>> reply_of(ask("Capital of France?")).stop_reason
    'stop'
    """
    if isinstance(result, Reply):
        return result
    reply = getattr(result, _REPLY, None)
    if not isinstance(reply, Reply):
        raise InvalidRequest(f"a {type(result).__name__} that no guarded function returned carries no reply")
    return reply


def _as_returned(raw: Any, reply: Reply, shape: Any = None) -> Any:
    """What the function returned, as the guard let it through, with ``reply`` attached:
    a string or a chat completion (object or dict) of the same type, holding the guard's
    text (cut at the output cap, a loop's repeats left out). A cache hit (the function
    was not called) answers in ``shape``, what the function returned for such a call
    before: a string, or a completion like it (the cached text, one choice, no tool
    calls, a usage of zero). Anything else (a stream the guard read to meter it; a hit
    of a shape not seen) gives the reply."""
    if raw is None and reply.cached:
        if isinstance(shape, str):
            raw = shape
        elif shape is not None:
            ended = "length" if reply.cached_stop_reason == "length" else "stop"
            raw = completion_from_cache(shape, reply.text, ended, f"chatcmpl-{reply.request_id}")
    if isinstance(raw, str):
        out: Any = _GuardedStr(reply.text)
    elif is_completion(raw):
        out = raw
        if chunk_from_completion(raw).text != reply.text:
            finish = "length" if reply.stop_reason == "length" else None
            out = completion_with_text(raw, reply.text, finish)
        if isinstance(out, dict):
            out = _GuardedDict(out)
    else:
        return reply
    try:
        object.__setattr__(out, _REPLY, reply)
    except (AttributeError, TypeError):  # an object that takes no new attributes
        return reply
    return out


class _CallShape:
    """How a call of a guarded function splits: a method's instance (or class), the
    messages (by position, or by their parameter's name), and the function's own
    arguments; an output cap given by position goes by name (the guard hands it on)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        #: Whether ``fn`` is a method: its first parameter is ``self`` or ``cls``.
        self.is_method = bool(positional) and positional[0] in ("self", "cls")
        after = positional[1:] if self.is_method else positional
        self.messages_name = after[0] if after else None
        #: The names of the positional parameters after the messages.
        self.rest = after[1:]
        self.name = getattr(fn, "__qualname__", repr(fn))

    def bind(self, backend: Function, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[Function, Any, dict[str, Any]]:
        """The backend for this call, its messages and the guard's keyword arguments."""
        owner, args = (args[:1], args[1:]) if self.is_method else ((), args)
        if args:
            messages, args = args[0], args[1:]
        elif self.messages_name is not None and self.messages_name in kwargs:
            kwargs = dict(kwargs)
            messages = kwargs.pop(self.messages_name)
        else:
            raise TypeError(f"{self.name}() takes the messages (or a prompt string) first")
        if "max_tokens" in self.rest[: len(args)]:  # the cap and what follows it, by name
            cut = self.rest.index("max_tokens")
            kwargs = {**kwargs, **dict(zip(self.rest[cut:], args[cut:], strict=False))}
            args = args[:cut]
        return backend.bind(*args, before=owner), messages, kwargs


def _annotated_str(fn: Any) -> bool:
    """Whether ``fn`` is annotated to return ``str`` (also as a string annotation)."""
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is str or annotation == "str"


# The function's kind decides what its guarded twin returns (see the docstring). A
# function typed as returning an Iterator may be a generator function (a guarded
# stream) or return a stream (the Reply): type checkers cannot tell them apart.
@overload
def guard(fn: Callable[..., AsyncIterator[Any]], /) -> Guarded[AsyncGuardStream]: ...
@overload
def guard(fn: Callable[..., Coroutine[Any, Any, T]], /) -> Guarded[Coroutine[Any, Any, T]]: ...
@overload
def guard(fn: Callable[..., Generator[Any, Any, Any]], /) -> Guarded[GuardStream]: ...
@overload
def guard(fn: Callable[..., Iterator[Any]], /) -> Guarded[GuardStream | Reply]: ...
@overload
def guard(fn: Callable[..., T], /) -> Guarded[T]: ...
@overload
def guard(fn: None = None, /, **options: Any) -> _Decorator: ...


def guard(fn: Any = None, /, **options: Any) -> Any:
    """Decorate a function that takes OpenAI-style ``messages`` and returns a string, an
    OpenAI chat completion (object or dict), or an iterator of stream chunks or
    strings; sync or async. ``options`` are :class:`Guard`'s; ``model=`` is required
    (the guard counts and prices with it). Give the function a ``max_tokens``
    parameter and pass it on: it is handed the output cap, and with a budget it must
    take it, or the model could overspend what the budget reserved.

    The decorated function takes the messages or a prompt string (which it is handed
    as one user message, as everywhere in the guard; by position or by its parameter's
    name) plus ``user=``, ``session=``, ``tags=`` (handed on to a function that names
    them), and returns what the function returns, of the same type (a method, its first
    parameter ``self`` or ``cls``, is called with its instance, a static method as it is):

    - a string, or an OpenAI chat completion (object or dict, tool calls and all),
      holding the guard's text: cut at the output cap (``finish_reason="length"``),
      a loop's repeats left out; :func:`reply_of` gives the guard's
      :class:`~tokenguard.Reply` (usage, cost, stop reason) for it;
    - a generator function gives a guarded stream of text pieces, whose ``.reply`` is
      the Reply once it ends (async generators: an async one);
    - a function that returns a stream gives the Reply (the guard read the stream to
      meter it; write a generator function to stream), as does a call answered
      without the function (a cache step's hit).

    Async functions return a coroutine of the same. The wrapper's ``.guard`` attribute
    is the :class:`Guard` (``ask.guard.ledger``).

    >>> @guard(model="gpt-4o", max_output_tokens=64)
    ... def ask(messages, max_tokens):
    ...     return "Paris"
    >>> ask("Capital of France?")
    'Paris'
    """
    if "backend" in options:
        raise ConfigError("@guard wraps the decorated function; it takes no backend=")

    def decorate(fn: Any) -> Any:
        if isinstance(fn, (staticmethod, classmethod)):  # @guard above @staticmethod: guard the function within
            return type(fn)(decorate(fn.__func__))
        backend = Function(fn)
        shape = _CallShape(fn)
        # What the function last returned, apart for calls with stream=True: a cache hit
        # answers in the same shape (a string, a completion like it, or the Reply for a
        # stream). Before any return, a function annotated to return str returns strings.
        shapes: dict[bool, Any] = {}
        first_shape = "" if _annotated_str(fn) else None
        g = Guard(backend, **options)

        def prepare(bound: Function, prompt_or_messages: Any, kwargs: dict[str, Any]) -> Call:
            return g.prepare(prompt_or_messages, backend=bound, **kwargs)

        def _returned(raw: Any, reply: Reply, kwargs: dict[str, Any]) -> Any:
            streamed = bool(kwargs.get("stream"))
            if raw is not None:
                shapes[streamed] = "" if isinstance(raw, str) else raw if is_completion(raw) else None
            return _as_returned(raw, reply, shapes.get(streamed, first_shape))

        wrapper: Callable[..., Any]
        if inspect.isasyncgenfunction(fn):

            def wrapper(*args: Any, **kwargs: Any) -> AsyncGuardStream:
                bound, prompt_or_messages, kwargs = shape.bind(backend, args, kwargs)
                return g.open_astream(functools.partial(prepare, bound, prompt_or_messages, kwargs))

        elif backend.is_async:

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                bound, prompt_or_messages, kwargs = shape.bind(backend, args, kwargs)
                reply = await g.open_astream(functools.partial(prepare, bound, prompt_or_messages, kwargs)).aread()
                return _returned(bound.result, reply, kwargs)

        elif inspect.isgeneratorfunction(fn):

            def wrapper(*args: Any, **kwargs: Any) -> GuardStream:
                bound, prompt_or_messages, kwargs = shape.bind(backend, args, kwargs)
                return g.open_stream(prepare(bound, prompt_or_messages, kwargs))

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                bound, prompt_or_messages, kwargs = shape.bind(backend, args, kwargs)
                reply = g.open_stream(prepare(bound, prompt_or_messages, kwargs)).read()
                return _returned(bound.result, reply, kwargs)

        guarded: Any = functools.update_wrapper(wrapper, fn)
        guarded.guard = g
        return guarded

    return decorate(fn) if fn is not None else decorate
