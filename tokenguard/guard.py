"""The :class:`Guard`: one metered, bounded pipeline around any backend.

The guard only composes steps (DESIGN.md): admit, scope, fit, cache, reserve,
generate, meter, settle, remember. Steps the user does not configure are absent.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from tokenguard.admit import Admit
from tokenguard.backends.base import Backend
from tokenguard.backends.callable import Callable
from tokenguard.budget import Budget
from tokenguard.call import Call
from tokenguard.errors import BudgetExceeded, InputTooLong, UnknownTokenizer
from tokenguard.generation import OutputCap
from tokenguard.history import SessionHistory
from tokenguard.ledger import Ledger
from tokenguard.meter import Meter
from tokenguard.pricing import PriceSpec, Pricing
from tokenguard.reserve import Reserve, Settle, release
from tokenguard.steps import CacheStep, FitStep, RememberStep, ScopeStep
from tokenguard.stream import AsyncGuardStream, GuardStream
from tokenguard.tokens import DEFAULT_MODEL_NAME, Tokenizer, get_tokenizer
from tokenguard.usage import Reply, Usage

__all__ = ["Guard"]

Messages = Sequence[Mapping[str, Any]]

# The stop_reason written for a call refused before the backend ran.
_REFUSALS: dict[type[BaseException], str] = {
    InputTooLong: "input_too_long",
    BudgetExceeded: "budget_exceeded",
}


def _as_messages(prompt_or_messages: str | Messages) -> list[dict[str, Any]]:
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    if isinstance(prompt_or_messages, Mapping):
        return [dict(prompt_or_messages)]
    return [dict(m) for m in prompt_or_messages]


class Guard:
    """Meter, bound and record every call to a backend.

    ``backend=None`` is the bundled runner on its default model (loaded on first use);
    a plain function is wrapped in :class:`~tokenguard.backends.Callable`. ``model``
    names the model for prices and the ledger, and the tokenizer for backends that do
    not report their own (default: the backend's model, else the bundled model).

    ``max_input_tokens`` refuses longer inputs with :class:`~tokenguard.InputTooLong`;
    ``max_output_tokens`` caps every reply, on backends that ignore it too. ``budget``
    is a :class:`~tokenguard.Budget` or several; ``ledger`` a path or a
    :class:`~tokenguard.Ledger` (``None``: in memory, so ``guard.ledger`` always exists);
    ``prices`` sets ``{model: (usd_per_mtok_in, usd_per_mtok_out)}``.

    >>> guard = Guard(lambda messages: "hello", max_output_tokens=16)
    >>> guard.complete("hi").text
    'hello'
    """

    def __init__(
        self,
        backend: Backend | Any = None,
        *,
        model: str | None = None,
        max_input_tokens: int | None = None,
        max_output_tokens: int = 512,
        budget: Budget | Sequence[Budget] | None = None,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        prices: Mapping[str, PriceSpec] | None = None,
        tokenizer: Tokenizer | str | None = None,
        scope: ScopeStep | None = None,
        fit: FitStep | None = None,
        cache: CacheStep | None = None,
        remember: RememberStep | None = None,
        history: SessionHistory | None = None,
    ) -> None:
        if backend is None:
            from tokenguard.backends.runner import Runner

            backend = Runner()
        elif not isinstance(backend, Backend):
            if not callable(backend):
                raise TypeError(f"backend must be a Backend or a function, got {type(backend).__name__}")
            backend = Callable(backend)
        if max_output_tokens < 0:
            raise ValueError("max_output_tokens must be >= 0")
        self.backend: Backend = backend
        self.model: str = model or backend.model or DEFAULT_MODEL_NAME
        self.max_output_tokens = max_output_tokens
        self.pricing = Pricing(prices)
        self.ledger: Ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        budgets = [] if budget is None else [budget] if isinstance(budget, Budget) else list(budget)
        self.budgets: list[Budget] = budgets
        self.history = history if history is not None else SessionHistory()
        self._tokenizer_spec = tokenizer
        self._tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self._tokenizer_lock = threading.Lock()

        # The pipeline, in order. None = the step is absent.
        self.admit: Admit | None = Admit(max_input_tokens) if max_input_tokens is not None else None
        self.scope = scope
        self.fit = fit
        self.cache = cache
        self.reserve: Reserve | None = Reserve(budgets, self.pricing) if budgets else None
        self.meter = Meter(self.ledger, self.pricing)
        self.settle: Settle | None = Settle() if budgets else None
        self.remember = remember

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
                        tok = get_tokenizer(spec)
                    else:
                        tok = self.backend.tokenizer() or self._model_tokenizer()
                    self._tokenizer = tok
        return self._tokenizer

    def _model_tokenizer(self) -> Tokenizer:
        try:
            return get_tokenizer(self.model)
        except UnknownTokenizer as error:
            raise UnknownTokenizer(
                f"{error}. The guard meters with the tokenizer of model {self.model!r}; "
                "pass Guard(tokenizer=...) with a tokenizer name or file for this backend"
            ) from error

    # -- the pipeline -------------------------------------------------------------------

    def _new_call(
        self,
        prompt_or_messages: str | Messages,
        user: str | None,
        session: str | None,
        tags: Any,
        params: dict[str, Any],
        backend: Backend | None = None,
        pass_prompt: bool = False,
    ) -> Call:
        """A new call. ``pass_prompt``: hand a prompt string to the backend as the string
        (the decorator's functions take what their caller gave), not as messages."""
        max_out = self.max_output_tokens
        asked = params.pop("max_tokens", None)
        if asked is not None:
            max_out = min(max_out, int(asked))
        params["max_tokens"] = max_out
        backend = backend or self.backend
        if session is not None and getattr(backend, "accepts_session", False):
            params["session"] = session
        return Call(
            request_id=uuid.uuid4().hex,
            messages=_as_messages(prompt_or_messages),
            params=params,
            max_output_tokens=max_out,
            model=self.model,
            backend=backend,
            tokenizer=self.tokenizer,
            user=user,
            session=session,
            tags=tags,
            backend_input=prompt_or_messages if pass_prompt and isinstance(prompt_or_messages, str) else None,
        )

    def _before(self, call: Call) -> Reply | None:
        """Steps admit..reserve. A refusal is metered (no tokens) and re-raised."""
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
            release(call)
            reason = next((r for t, r in _REFUSALS.items() if isinstance(error, t)), "error")
            usage = Usage(cost_usd=0.0, latency_s=time.perf_counter() - call.started)
            self.meter(call, usage, reason, error)
            raise
        return None

    def _backend_input(self, call: Call) -> Any:
        # A prompt string goes to the backend as given, unless a step changed the messages.
        raw = call.backend_input
        if isinstance(raw, str) and call.messages == [{"role": "user", "content": raw}]:
            return raw
        return call.messages

    def _after(
        self, call: Call, cap: OutputCap, error: BaseException | None = None, cancelled: bool = False
    ) -> Reply:
        """Steps meter, settle and remember, once per call whatever happened."""
        if cancelled:
            stop_reason = "cancelled"
        elif error is not None:
            stop_reason = "error"
        elif cap.cut:
            stop_reason = "length"
        else:
            stop_reason = cap.finish_reason or "stop"
        # Nothing came back from a failed or cancelled call: nothing was spent.
        spent = cap.seen_output or (error is None and not cancelled)
        reported = cap.usage
        try:
            if not spent:
                counts = (0, 0, 0)
            else:
                input_tokens = reported.input_tokens if reported and reported.input_tokens is not None else None
                output_tokens = reported.output_tokens if reported and reported.output_tokens is not None else None
                counts = (
                    call.count_input() if input_tokens is None else input_tokens,
                    cap.output_tokens() if output_tokens is None else output_tokens,
                    (reported.cached_input_tokens or 0) if reported else 0,
                )
            usage = self.meter.usage(call, *counts)
        except Exception as count_error:  # noqa: BLE001 - the row must still be written
            usage = self.meter.usage(call, 0, 0)
            error = error or count_error
        reply = Reply(
            text=cap.text,
            stop_reason=stop_reason,
            messages=call.messages,
            usage=usage,
            request_id=call.request_id,
            model=call.model,
        )
        try:
            self.meter(call, usage, stop_reason, error)
        finally:
            if self.settle is not None:
                if spent:
                    self.settle(call, usage)
                else:
                    release(call)
        if error is None and not cancelled and self.remember is not None:
            self.remember(call, reply)
        return reply

    def _open_stream(self, call: Call) -> GuardStream:
        hit = self._before(call)
        if hit is not None:
            return GuardStream(self, call, None, reply=hit)
        try:
            chunks = iter(call.backend.stream(self._backend_input(call), call.params))
        except BaseException as error:
            self._after(call, OutputCap(call.tokenizer, call.max_output_tokens), error)
            raise
        return GuardStream(self, call, chunks)

    def _open_astream(self, call: Call) -> AsyncGuardStream:
        hit = self._before(call)
        if hit is not None:
            return AsyncGuardStream(self, call, None, reply=hit)
        try:
            chunks = aiter(call.backend.astream(self._backend_input(call), call.params))
        except BaseException as error:
            self._after(call, OutputCap(call.tokenizer, call.max_output_tokens), error)
            raise
        return AsyncGuardStream(self, call, chunks)

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
        return self._open_stream(self._new_call(prompt_or_messages, user, session, tags, params))

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
        stream = self.stream(prompt_or_messages, user=user, session=session, tags=tags, **params)
        for _ in stream:
            pass
        assert stream.reply is not None
        return stream.reply

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
        turn = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        reply = self.complete(self.history.get(session) + [turn], user=user, session=session, tags=tags, **params)
        self._remember_turn(session, turn, reply)
        return reply

    def _remember_turn(self, session: str, turn: dict[str, Any], reply: Reply) -> None:
        if reply.stop_reason not in ("error", "cancelled"):
            self.history.append(session, turn, {"role": "assistant", "content": reply.text})

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
        return self._open_astream(self._new_call(prompt_or_messages, user, session, tags, params))

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
        stream = self.astream(prompt_or_messages, user=user, session=session, tags=tags, **params)
        async for _ in stream:
            pass
        assert stream.reply is not None
        return stream.reply

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
        turn = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        reply = await self.acomplete(
            self.history.get(session) + [turn], user=user, session=session, tags=tags, **params
        )
        self._remember_turn(session, turn, reply)
        return reply

    def __repr__(self) -> str:
        return f"Guard({self.backend!r}, model={self.model!r})"
