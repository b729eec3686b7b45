"""``@guard``: put an existing model call behind a :class:`~tokenguard.Guard`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from tokenguard._guard import Guard
from tokenguard.backends import Function
from tokenguard.errors import ConfigError
from tokenguard.pipeline import AsyncGuardStream, Call, GuardStream

__all__ = ["guard"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def guard(fn: F, /) -> Callable[..., Any]: ...


@overload
def guard(fn: None = None, /, **options: Any) -> Callable[[F], Callable[..., Any]]: ...


def guard(fn: Any = None, /, **options: Any) -> Any:
    """Decorate a function that takes OpenAI-style ``messages`` and returns a string, an
    OpenAI chat completion (object or dict), or an iterator of stream chunks or
    strings; sync or async. ``options`` are :class:`Guard`'s; ``model=`` is required
    (the guard counts and prices with it). Give the function a ``max_tokens``
    parameter and pass it on: it is handed the output cap, and with a budget it must
    take it, or the model could overspend what the budget reserved.

    The decorated function takes the messages or a prompt string (which it is handed
    as one user message, as everywhere in the guard) plus ``user=``, ``session=``,
    ``tags=`` and returns a :class:`~tokenguard.Reply` (a coroutine of one for an async
    function); a generator function returns a guarded stream instead. Its ``.guard``
    attribute is the :class:`Guard` (``ask.guard.ledger``).

    >>> @guard(model="gpt-4o", max_output_tokens=64)
    ... def ask(messages, max_tokens):
    ...     return "Paris"
    >>> ask("Capital of France?").text
    'Paris'
    """
    if "backend" in options:
        raise ConfigError("@guard wraps the decorated function; it takes no backend=")

    def decorate(fn: Any) -> Any:
        backend = Function(fn)
        g = Guard(backend, **options)
        if g.budgets and not backend.takes_max_tokens:
            raise ConfigError(
                f"{getattr(fn, '__qualname__', fn)}() takes no max_tokens, so the model it calls may "
                f"generate past the {g.max_output_tokens} output tokens the budget reserves and overspend "
                "it: add a max_tokens parameter and pass it on (create(..., max_tokens=max_tokens))"
            )

        def prepare(prompt_or_messages: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
            # The function is handed its own positional arguments after the messages.
            return g.prepare(prompt_or_messages, backend=backend.bind(*args), **kwargs)

        wrapper: Callable[..., Any]
        if inspect.isasyncgenfunction(fn):

            def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> AsyncGuardStream:
                return g.open_astream(functools.partial(prepare, prompt_or_messages, args, kwargs))

        elif backend.is_async:

            async def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> Any:
                return await g.open_astream(functools.partial(prepare, prompt_or_messages, args, kwargs)).aread()

        elif inspect.isgeneratorfunction(fn):

            def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> GuardStream:
                return g.open_stream(prepare(prompt_or_messages, args, kwargs))

        else:

            def wrapper(prompt_or_messages: Any, *args: Any, **kwargs: Any) -> Any:
                return g.open_stream(prepare(prompt_or_messages, args, kwargs)).read()

        guarded: Any = functools.update_wrapper(wrapper, fn)
        guarded.guard = g
        return guarded

    return decorate(fn) if fn is not None else decorate
