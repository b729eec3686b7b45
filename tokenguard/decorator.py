"""``@guard``: put an existing model call behind a :class:`~tokenguard.Guard`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable as CallableType
from typing import Any, TypeVar, overload

from tokenguard.backends.callable import Callable
from tokenguard.guard import Guard

__all__ = ["guard"]

F = TypeVar("F", bound=CallableType[..., Any])


@overload
def guard(fn: F, /) -> CallableType[..., Any]: ...


@overload
def guard(fn: None = None, /, **options: Any) -> CallableType[[F], CallableType[..., Any]]: ...


def guard(fn: Any = None, /, **options: Any) -> Any:
    """Decorate a function that takes OpenAI-style ``messages`` (or a prompt string)
    and returns a string, an OpenAI chat completion (object or dict), or an iterator of
    stream chunks or strings; sync or async. ``options`` are :class:`Guard`'s.

    The decorated function takes the same input plus ``user=``, ``session=``, ``tags=``
    and returns a :class:`~tokenguard.Reply` (a coroutine of one for an async
    function); a generator function returns a guarded stream instead. Its ``.guard``
    attribute is the :class:`Guard` (``ask.guard.ledger``).

    >>> @guard(model="gpt-4o", max_output_tokens=64)
    ... def ask(messages):
    ...     return "Paris"
    >>> ask("Capital of France?").text
    'Paris'
    """
    if "backend" in options:
        raise TypeError("@guard wraps the decorated function; it takes no backend=")

    def decorate(fn: Any) -> Any:
        backend = Callable(fn)
        g = Guard(backend, **options)

        def call(open_: Any, prompt_or_messages: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            user = kwargs.pop("user", None)
            session = kwargs.pop("session", None)
            tags = kwargs.pop("tags", None)
            bound = backend.bind(*args) if args else backend
            return open_(g._new_call(prompt_or_messages, user, session, tags, kwargs, bound, pass_prompt=True))

        if inspect.isasyncgenfunction(fn):

            def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> Any:
                return call(g._open_astream, prompt_or_messages, args, kwargs)

        elif backend.is_async:

            async def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                stream = call(g._open_astream, prompt_or_messages, args, kwargs)
                async for _ in stream:
                    pass
                return stream.reply

        elif inspect.isgeneratorfunction(fn):

            def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> Any:
                return call(g._open_stream, prompt_or_messages, args, kwargs)

        else:

            def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> Any:
                stream = call(g._open_stream, prompt_or_messages, args, kwargs)
                for _ in stream:
                    pass
                return stream.reply

        functools.update_wrapper(wrapper, fn)
        wrapper.guard = g  # type: ignore[attr-defined]
        return wrapper

    return decorate(fn) if fn is not None else decorate
