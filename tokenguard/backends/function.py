"""A backend around any function: ``fn(messages, *, max_tokens, **params)``."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import types
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tokenguard.backends.base import Backend, Chunk, Params, aiter_in_thread, iter_async
from tokenguard.backends.openai_format import chunk_from_completion, chunk_from_stream_item, is_completion
from tokenguard.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from tokenguard.tokens import Message

__all__ = ["Function"]


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _code_identity(fn: Callable[..., Any]) -> list[str]:
    """A Python function's code, and the values its closure cells, defaults and the
    module globals it reads hold, as text that is the same in every process: plain data
    by its value (a long string by its digest), any other object (a client, a model) by
    its type."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    held = [_cell_value(cell) for cell in getattr(fn, "__closure__", None) or ()]
    held += [getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None)]
    module = getattr(fn, "__globals__", {})
    held += [(name, module[name]) for name in _names_read(code) if isinstance(module.get(name), _DATA)]
    return [_code_digest(code), _plain(held)]


@functools.lru_cache(maxsize=1024)
def _names_read(code: types.CodeType) -> tuple[str, ...]:
    """The global (and attribute) names ``code`` reads, its nested code's too: a
    comprehension or a lambda inside the function is code of its own."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(dict.fromkeys(_names_read(const)))
    return tuple(names)


# Global values a function's identity reads (a module's SYSTEM_PROMPT), as its closure's
# are read: constant data only. A list or dict it keeps state in (a log, a counter)
# would start its cache afresh at every call; modules, classes and functions it names
# are left to its code.
_DATA = (str, bytes, int, float, bool, tuple, frozenset)


@functools.lru_cache(maxsize=1024)
def _code_digest(code: types.CodeType) -> str:
    """A digest of what ``code`` does: its bytecode, constants and the names it reads;
    nested code (a lambda, a comprehension) by its own digest, as a code object's repr
    holds its address. Remembered per code object (immutable): a cache asks each call."""
    text = _const_text(code.co_consts) + "\0" + " ".join(code.co_names)  # the globals and attributes it reads
    return _digest(code.co_code + text.encode("utf-8", "surrogatepass"))


def _const_text(const: Any) -> str:
    """A code constant as text that every process writes alike (a frozenset's order
    follows string hashing, which differs between processes)."""
    if isinstance(const, types.CodeType):
        return _code_digest(const)
    if isinstance(const, tuple):
        return "(" + ", ".join(map(_const_text, const)) + ")"
    if isinstance(const, frozenset):
        return "frozenset(" + ", ".join(sorted(map(_const_text, const))) + ")"
    return repr(const)


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not assigned yet
        return None


def _plain(value: Any, depth: int = 0) -> str:
    """``repr`` of plain data (a long string or bytes, or a container too big or too deep
    to walk on every call, by the digest of its ``repr``); any other object by its type."""
    if isinstance(value, (str, bytes)) and len(value) > 256:
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        return f"{type(value).__name__}:{_digest(data)}"
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return repr(value)
    if isinstance(value, (list, tuple, frozenset, set, dict)):
        if depth >= 4 or len(value) > 64:  # few-shot examples, a table: by content, at C speed
            return f"{type(value).__name__}:{_digest(_container_repr(value).encode('utf-8', 'surrogatepass'))}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{_plain(k, depth + 1)}: {_plain(v, depth + 1)}" for k, v in value.items()) + "}"
        items = [_plain(item, depth + 1) for item in value]
        return f"{type(value).__name__}({', '.join(sorted(items) if isinstance(value, (set, frozenset)) else items)})"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _container_repr(value: list[Any] | tuple[Any, ...] | frozenset[Any] | set[Any] | dict[Any, Any]) -> str:
    """A container's ``repr``, a set's in sorted order (its own follows string hashing,
    which differs between processes); an object in it shows its address, so such a
    container matches only itself, in this process."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(repr, value))) + "}"
    return repr(value)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _names(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (not merely ``**kwargs``)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _is_async(fn: Callable[..., Any]) -> bool:
    call = type(fn).__call__  # an object whose __call__ is async
    return (
        inspect.iscoroutinefunction(fn)
        or inspect.isasyncgenfunction(fn)
        or inspect.iscoroutinefunction(call)
        or inspect.isasyncgenfunction(call)
    )


_RETURNS = ("a guarded function must return a str, an OpenAI chat completion (object or dict) "
            "or an iterator of str / stream chunks")


def _chunks(result: Any) -> Iterator[Chunk]:
    """Chunks of whatever a sync function returned."""
    if isinstance(result, str):
        yield Chunk(text=result, finish_reason="stop")  # the whole answer, at once
    elif is_completion(result):
        yield chunk_from_completion(result)
    elif hasattr(result, "__aiter__"):
        yield from _chunks(iter_async(result))
    elif isinstance(result, (Mapping, bytes, bytearray)):  # iterable, but not a stream of pieces
        raise InvalidRequest(_RETURNS + f", got a {type(result).__name__} that is none of these"
                             + (" (a dict without 'choices')" if isinstance(result, Mapping) else ""))
    elif hasattr(result, "__iter__"):
        try:
            for item in result:
                yield chunk_from_stream_item(item)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    else:
        raise InvalidRequest(f"{_RETURNS}, got {type(result).__name__}")


async def _achunks(result: Any) -> AsyncGenerator[Chunk, None]:
    """Chunks of whatever an async function returned (awaited)."""
    if hasattr(result, "__aiter__"):
        try:
            async for item in result:
                yield chunk_from_stream_item(item)
        finally:
            aclose = getattr(result, "aclose", None) or getattr(result, "close", None)
            if aclose is not None:
                done = aclose()
                if inspect.isawaitable(done):
                    await done
    elif isinstance(result, str) or is_completion(result):
        for chunk in _chunks(result):
            yield chunk
    else:
        async for chunk in aiter_in_thread(lambda: _chunks(result)):
            yield chunk


class Function(Backend):
    """Wrap ``fn(messages, *, max_tokens, **params)`` as a backend.

    ``fn`` is handed a list of OpenAI-style messages (a prompt string becomes one user
    message, as everywhere in the guard) and may be sync or async and return a ``str``,
    an iterator (or async iterator) of ``str`` pieces, an OpenAI chat completion (object
    or dict, whose ``usage`` is used) or a stream of OpenAI chunks. ``max_tokens`` is
    passed only when ``fn`` accepts it.
    The guard meters it with the tokenizer named by ``Guard(model=...)``.

    >>> backend = Function(lambda messages, max_tokens: "hi")
    """

    name = "function"

    def __init__(self, fn: Callable[..., Any], *, model: str | None = None) -> None:
        if not callable(fn):
            raise ConfigError(f"Function needs a function, got {type(fn).__name__}")
        self.fn = fn
        self.model = model
        self.is_async = _is_async(fn)
        #: Whether ``fn`` can be handed the output cap; one that cannot may generate past it.
        self.takes_max_tokens = _accepts(fn, "max_tokens")
        #: Whether ``fn`` names a ``user`` parameter: it is handed the call's ``user=``
        #: (which the guard takes for its budgets and ledger) rather than its default.
        self.accepts_user = _names(fn, "user")
        #: Whether ``fn`` names ``session`` and ``tags`` parameters: it is handed the call's.
        self.accepts_session = _names(fn, "session")
        self.accepts_tags = _names(fn, "tags")
        #: What ``fn`` returned on this backend's last call (awaited, for an async ``fn``):
        #: meaningful on a per-call copy from :meth:`bind`.
        self.result: Any = None
        self._before: tuple[Any, ...] = ()
        self._args: tuple[Any, ...] = ()

    def accepts(self, name: str) -> bool:
        """Whether ``fn`` takes a parameter ``name`` (named, or through ``**kwargs``)."""
        return _accepts(self.fn, name)

    def bind(self, *args: Any, before: tuple[Any, ...] = ()) -> Function:
        """The same backend, calling ``fn(*before, messages, *args, ...)`` (``before``: a
        method's instance or class)."""
        bound = copy.copy(self)
        bound._before, bound._args = before, args
        bound.result = None
        return bound

    def _call(self, messages: Sequence[Message], params: Params) -> Any:
        kwargs = dict(params)
        if not self.takes_max_tokens:
            kwargs.pop("max_tokens", None)
        self.result = self.fn(*self._before, list(messages), *self._args, **kwargs)
        return self.result

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        if self.is_async:
            yield from iter_async(self.astream(messages, params))
            return
        yield from _chunks(self._call(messages, params))

    async def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        if self.is_async:
            result = self._call(messages, params)
            if inspect.isawaitable(result):
                result = self.result = await result
            async with contextlib.aclosing(_achunks(result)) as chunks:  # closed at once when we are
                async for chunk in chunks:
                    yield chunk
            return
        # A sync function blocks: call it, and iterate what it returns, off the loop.
        async for chunk in aiter_in_thread(lambda: self.stream(messages, params)):
            yield chunk

    def cache_identity(self) -> object:
        """Which function, and the arguments bound to it: two decorated functions never
        share answers, nor one function called with different arguments. A function is
        its name, its code (two lambdas differ; an edited function answers anew) and
        what its closure and defaults hold (two functions one factory made differ)."""
        fn = self.fn
        return [self.name, f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}", self.model,
                [*self._before, *self._args], *_code_identity(fn)]

    def __repr__(self) -> str:
        return f"Function({getattr(self.fn, '__qualname__', self.fn)!r})"
