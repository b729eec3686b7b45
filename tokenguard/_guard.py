"""The :class:`Guard`: one metered, bounded pipeline around any backend.

The guard only composes the steps of :mod:`tokenguard.pipeline` (DESIGN.md): admit,
scope, fit, cache, reserve, generate, meter, settle, remember. A step the user does
not configure is absent.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from tokenguard._repetition import RepetitionStop
from tokenguard.accounting import Budget, Ledger, PriceSpec, Pricing, Reply
from tokenguard.backends import Backend, Chunk, Function
from tokenguard.context import SessionHistory
from tokenguard.errors import ConfigError, InvalidRequest, UnknownTokenizer
from tokenguard.pipeline import (
    Admit,
    AsyncGuardStream,
    CacheStep,
    Call,
    ChunkWatcher,
    FitStep,
    Generation,
    GuardStream,
    Meter,
    Outcome,
    OutputCap,
    RememberStep,
    RememberTurn,
    Reserve,
    ScopeStep,
    Settle,
    as_messages,
)
from tokenguard.tokens import DEFAULT_MODEL_NAME, Tokenizer, get_tokenizer

__all__ = ["Guard"]

Messages = Sequence[Mapping[str, Any]]
_DEFAULT_STOP = RepetitionStop()
_Stream = TypeVar("_Stream", GuardStream, AsyncGuardStream)


def _as_backend(backend: object) -> Backend:
    if backend is None:
        from tokenguard.backends import BundledRunner

        return BundledRunner()
    if isinstance(backend, Backend):
        return backend
    if callable(backend):
        return Function(backend)
    raise ConfigError(
        f"backend must be a tokenguard.backends.Backend or a function, got {type(backend).__name__}"
    )


def _as_turn(message: object) -> dict[str, Any]:
    if isinstance(message, str):
        return {"role": "user", "content": message}
    if isinstance(message, Mapping):
        return dict(message)
    raise InvalidRequest(f"a chat message is a string or a message dict, got {type(message).__name__}")


def _max_tokens(asked: object, cap: int) -> int:
    """The call's output cap: ``max_tokens=`` may lower the guard's, never raise it."""
    if asked is None:
        return cap
    try:
        value = operator.index(asked)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if isinstance(asked, bool) or value < 0:
        raise InvalidRequest(f"max_tokens must be an integer >= 0, got {asked!r}")
    return min(cap, value)


class Guard:
    """Meter, bound and record every call to a backend.

    ``backend=None`` is the bundled runner on its default model (loaded on first use);
    a plain function is wrapped in :class:`~tokenguard.backends.Function`. ``model``
    names the model for prices and the ledger, and the tokenizer for backends that do
    not report their own (default: the backend's model, else the bundled model).

    ``max_input_tokens`` refuses longer inputs with :class:`~tokenguard.InputTooLong`;
    ``max_output_tokens`` caps every reply, on backends that ignore it too. ``budget``
    is a :class:`~tokenguard.Budget` or several; ``ledger`` a path or a
    :class:`~tokenguard.Ledger` (``None``: in memory, so ``guard.ledger`` always exists);
    ``prices`` sets ``{model: (usd_per_mtok_in, usd_per_mtok_out)}``. ``stop`` watches
    every reply for loops and ends a looping one (a :class:`~tokenguard.RepetitionStop`,
    on by default; ``None`` turns it off). ``scope``, ``fit``, ``cache`` and
    ``remember`` plug in steps of :mod:`tokenguard.pipeline`.

    >>> guard = Guard(lambda messages: "hello", max_output_tokens=16)
    >>> guard.complete("hi").text
    'hello'
    """

    def __init__(
        self,
        backend: Backend | Callable[..., Any] | None = None,
        *,
        model: str | None = None,
        max_input_tokens: int | None = None,
        max_output_tokens: int = 512,
        budget: Budget | Sequence[Budget] | None = None,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        prices: Mapping[str, PriceSpec] | None = None,
        tokenizer: Tokenizer | str | None = None,
        stop: ChunkWatcher | None = _DEFAULT_STOP,
        scope: ScopeStep | None = None,
        fit: FitStep | None = None,
        cache: CacheStep | None = None,
        remember: RememberStep | None = None,
        history: SessionHistory | None = None,
    ) -> None:
        if max_output_tokens < 0:
            raise ConfigError("max_output_tokens must be >= 0")
        self.backend: Backend = _as_backend(backend)
        self.model: str = model or self.backend.model or DEFAULT_MODEL_NAME
        self.max_output_tokens = max_output_tokens
        self.pricing = Pricing(prices)
        self.ledger: Ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self.budgets: list[Budget] = [] if budget is None else [budget] if isinstance(budget, Budget) else list(budget)
        self.history = history if history is not None else SessionHistory()
        self._tokenizer_spec = tokenizer
        self._tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self._tokenizer_lock = threading.Lock()

        # The pipeline, in order. None = the step is absent.
        self.admit: Admit | None = Admit(max_input_tokens) if max_input_tokens is not None else None
        self.scope = scope
        self.fit = fit
        self.cache = cache
        self.reserve: Reserve | None = Reserve(self.budgets, self.pricing) if self.budgets else None
        self.watchers: list[ChunkWatcher] = [OutputCap(), *([stop] if stop is not None else [])]
        self.meter = Meter(self.ledger, self.pricing)
        self.settle: Settle | None = Settle() if self.budgets else None
        self.remember: list[RememberStep] = [RememberTurn(self.history), *([remember] if remember else [])]

    @property
    def max_input_tokens(self) -> int | None:
        return self.admit.max_input_tokens if self.admit is not None else None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer every count is made with, resolved on first use: ``tokenizer=``,
        else the backend's own, else the one ``model`` names."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    spec = self._tokenizer_spec
                    if isinstance(spec, str):
                        self._tokenizer = get_tokenizer(spec)
                    else:
                        self._tokenizer = self.backend.tokenizer() or self._model_tokenizer()
        return self._tokenizer

    def _model_tokenizer(self) -> Tokenizer:
        try:
            return get_tokenizer(self.model)
        except UnknownTokenizer as error:
            raise UnknownTokenizer(
                f"{error}. The guard meters with the tokenizer of model {self.model!r}; "
                "pass Guard(tokenizer=...) with a tokenizer name or file for this backend"
            ) from error

    # -- the pipeline, for integrations: prepare a call, then open its stream ------------

    def prepare(
        self,
        prompt_or_messages: str | Messages,
        *,
        user: str | None = None,
        session: str | None = None,
        tags: Any = None,
        backend: Backend | None = None,
        **params: Any,
    ) -> Call:
        """A new :class:`~tokenguard.pipeline.Call`, checked but not started: the first
        half of :meth:`stream`, for integrations (the ``@guard`` decorator, a server)
        that run it with :meth:`open_stream` or :meth:`open_astream`. ``backend``
        replaces the guard's for this call."""
        messages = as_messages(prompt_or_messages)
        max_out = _max_tokens(params.pop("max_tokens", None), self.max_output_tokens)
        params["max_tokens"] = max_out
        backend = backend or self.backend
        if session is not None and backend.accepts_session:
            params["session"] = session
        return Call(
            request_id=uuid.uuid4().hex,
            messages=messages,
            params=params,
            max_output_tokens=max_out,
            model=self.model,
            backend=backend,
            tokenizer=self.tokenizer,
            user=user,
            session=session,
            tags=tags,
        )

    def open_stream(self, call: Call) -> GuardStream:
        """Run a prepared call: admission, cache and budgets now, before the backend is
        called; generation as the stream is read; meter, settle and remember when it ends."""
        return self._open(call, GuardStream, lambda: iter(call.backend.stream(call.messages, call.params)))

    def open_astream(self, call: Call) -> AsyncGuardStream:
        """The async twin of :meth:`open_stream`."""
        return self._open(call, AsyncGuardStream, lambda: aiter(call.backend.astream(call.messages, call.params)))

    def _open(
        self, call: Call, stream_type: type[_Stream], open_chunks: Callable[[], Iterator[Chunk] | AsyncIterator[Chunk]]
    ) -> _Stream:
        hit = self._before(call)
        if hit is not None:
            self._remember(call, hit)
            return stream_type.finished(hit)
        generation = Generation([watcher.watch(call) for watcher in self.watchers])
        on_end = functools.partial(self._finish, call)
        try:
            chunks = open_chunks()
        except BaseException as error:
            on_end(generation.outcome(error))
            raise
        return stream_type(call.request_id, chunks, generation, on_end)

    def _before(self, call: Call) -> Reply | None:
        """Steps admit..reserve; a cache hit is metered and returned. A refusal is
        metered (no tokens) and re-raised."""
        try:
            if self.admit is not None:
                self.admit(call)
            if self.scope is not None:
                self.scope(call)
            if self.fit is not None:
                self.fit(call)
            if self.cache is not None:
                hit = self.cache.lookup(call)
                if hit is not None:
                    self.meter(call, hit.usage, hit.stop_reason)
                    return hit
            if self.reserve is not None:
                self.reserve(call)
        except BaseException as error:
            self._finish(call, Outcome.refused(error))
            raise
        return None

    def _finish(self, call: Call, outcome: Outcome) -> Reply:
        """Steps meter, settle and remember: once per call, whatever happened."""
        usage = self.meter.usage(call, outcome)
        reply = Reply(
            text=outcome.text,
            stop_reason=outcome.stop_reason,
            messages=call.messages,
            usage=usage,
            request_id=call.request_id,
            model=call.model,
        )
        try:
            self.meter(call, usage, outcome.stop_reason, outcome.error)
        finally:
            if self.settle is not None:
                self.settle(call, usage)
        if outcome.succeeded:
            self._remember(call, reply)
        return reply

    def _remember(self, call: Call, reply: Reply) -> None:
        for step in self.remember:
            step(call, reply)

    # -- public API ---------------------------------------------------------------------

    def stream(
        self,
        prompt_or_messages: str | Messages,
        *,
        user: str | None = None,
        session: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> GuardStream:
        """Stream the reply as text pieces; the stream's ``.reply`` holds the
        :class:`Reply` once iteration ends. Admission and budgets are checked here,
        before the backend is called."""
        return self.open_stream(self.prepare(prompt_or_messages, user=user, session=session, tags=tags, **params))

    def complete(
        self,
        prompt_or_messages: str | Messages,
        *,
        user: str | None = None,
        session: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> Reply:
        """Generate a reply to a prompt string or an OpenAI-style message list.

        ``params`` go to the backend (``temperature``, ...); ``max_tokens`` may lower the
        guard's ``max_output_tokens`` for this call, never raise it.
        """
        return self.stream(prompt_or_messages, user=user, session=session, tags=tags, **params).read()

    def chat(
        self,
        message: str | Mapping[str, Any],
        *,
        session: str,
        user: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> Reply:
        """Send ``message`` in ``session``, whose earlier turns go along with it; the
        turn and its reply are added to the session's history when the call succeeds."""
        return self.open_stream(self._chat_call(message, session, user, tags, params)).read()

    def _chat_call(
        self, message: object, session: str, user: str | None, tags: Any, params: dict[str, Any]
    ) -> Call:
        turn = _as_turn(message)
        call = self.prepare([*self.history.get(session), turn], user=user, session=session, tags=tags, **params)
        call.turn = turn
        return call

    def astream(
        self,
        prompt_or_messages: str | Messages,
        *,
        user: str | None = None,
        session: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> AsyncGuardStream:
        """The async twin of :meth:`stream`: ``async for piece in guard.astream(...)``."""
        return self.open_astream(self.prepare(prompt_or_messages, user=user, session=session, tags=tags, **params))

    async def acomplete(
        self,
        prompt_or_messages: str | Messages,
        *,
        user: str | None = None,
        session: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> Reply:
        """The async twin of :meth:`complete`."""
        return await self.astream(prompt_or_messages, user=user, session=session, tags=tags, **params).aread()

    async def achat(
        self,
        message: str | Mapping[str, Any],
        *,
        session: str,
        user: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> Reply:
        """The async twin of :meth:`chat`."""
        return await self.open_astream(self._chat_call(message, session, user, tags, params)).aread()

    def __repr__(self) -> str:
        return f"Guard({self.backend!r}, model={self.model!r})"

