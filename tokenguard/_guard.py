"""The :class:`Guard`: one metered, bounded pipeline around any backend.

The guard only composes the steps of :mod:`tokenguard.pipeline` (docs/architecture.md): admit,
scope, fit, cache, reserve, generate, meter, settle, remember. A step the user does
not configure is absent.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from tokenguard._repetition import RepetitionStop
from tokenguard._settings import seconds, token_count
from tokenguard.accounting import Budget, Ledger, PriceSpec, Pricing, Reply
from tokenguard.accounting.budget import link_ledger
from tokenguard.backends import Backend, BundledRunner, Chunk, Function, OpenAICompatible
from tokenguard.context import ContextStrategy, SessionHistory, TailOnly
from tokenguard.context.messages import answered_calls_only
from tokenguard.errors import ConfigError, InvalidRequest, StoreError, UnknownTokenizer
from tokenguard.pipeline import (
    Admit,
    AsyncGuardStream,
    CacheStep,
    Call,
    ChunkWatcher,
    Fit,
    FitStep,
    Generation,
    GuardStream,
    Meter,
    Opened,
    Outcome,
    OutputCap,
    RememberStep,
    RememberTurn,
    Reserve,
    ScopeStep,
    Settle,
    TrimForwarded,
    as_messages,
    current_frame,
    framed,
    running_frame,
    with_deadline,
)
from tokenguard.stores import MemoryBudgetStore, MemoryLedgerStore
from tokenguard.tokens import Tokenizer, check_message, get_tokenizer

if TYPE_CHECKING:
    from tokenguard.telemetry import OTelMeter

__all__ = ["Guard"]

logger = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]
#: What one chat turn sends: a user's text, a message, or several messages (the results
#: of the tools the last answer called, one message each).
Turn = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]
_DEFAULT_STOP = RepetitionStop()
_DEFAULT_CONTEXT = TailOnly()
_DEFAULT_SCOPE = TrimForwarded()
# Characters of text under which a prompt is short enough to count on the event loop.
_INLINE_MAX_CHARS = 16_000


def _text_size(prompt_or_messages: object, limit: int) -> int:
    """The characters of a prompt or of its messages' text, counted up to ``limit``
    (``limit`` for anything else: parts, or not a prompt at all)."""
    if isinstance(prompt_or_messages, str):
        return len(prompt_or_messages)
    if not isinstance(prompt_or_messages, (list, tuple)):
        return limit
    size = 0
    for message in prompt_or_messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, str):
            return limit
        size += len(content)
        if size >= limit:
            return limit
    return size


def _is_llama_runner(obj: object) -> bool:
    # Checked by name: importing the runner (and torch) only to ask would be slow.
    return type(obj).__name__ == "LlamaRunner" and type(obj).__module__.startswith("tokenguard.runner")


def _is_openai_client(obj: object) -> bool:
    # The official client (openai.OpenAI or AsyncOpenAI), told by its module and shape.
    # An application's own subclass of one is one too.
    from_openai = any(kind.__module__.startswith("openai") for kind in type(obj).__mro__)
    return from_openai and hasattr(obj, "chat") and hasattr(obj, "base_url")


def _from_openai_client(client: Any, model: str) -> OpenAICompatible:
    """The backend that sends what the official client would: its base URL, its auth
    headers (or its key or Azure AD token provider, asked for each request),
    organization, project and custom headers, its default query (an ``api-version``)
    and its timeout; to OpenAI's own API, the output cap as ``max_completion_tokens``
    (its reasoning models refuse ``max_tokens``)."""
    own = {name: value for name, value in {**client.default_headers, **client.auth_headers}.items()
           if isinstance(value, str)  # the client marks headers it leaves out with an Omit
           and name.lower() not in _CLIENT_MADE_HEADERS and not name.lower().startswith("x-stainless")}
    provider = getattr(client, "_azure_ad_token_provider", None) or getattr(client, "_api_key_provider", None)
    base_url = str(client.base_url).rstrip("/")
    if _is_azure_client(client) and "/deployments" not in str(client.base_url.path):
        # As the Azure client routes a chat call: to the deployment its model names.
        base_url += f"/deployments/{urllib.parse.quote(model, safe='')}"
    cap = "max_completion_tokens" if httpx.URL(base_url).host == "api.openai.com" else "max_tokens"
    return OpenAICompatible(base_url, model, api_key=provider if callable(provider) else None, headers=own,
                            query=dict(client.default_query or {}), timeout=_client_timeout(client.timeout),
                            max_tokens_param=cap)


def _client_timeout(timeout: object) -> float | httpx.Timeout | None:
    """The official client's timeout as httpx takes it: a number, or its four limits
    (newer clients have a Timeout class of their own); ``None`` for anything else."""
    if isinstance(timeout, (int, float, httpx.Timeout)) and not isinstance(timeout, bool):
        return timeout
    limits = {name: getattr(timeout, name, None) for name in ("connect", "read", "write", "pool")}
    if all(value is None or isinstance(value, (int, float)) for value in limits.values()) and any(
            value is not None for value in limits.values()):
        return httpx.Timeout(None, **limits)
    return None


def _is_azure_client(client: object) -> bool:
    # By name, as _is_openai_client: importing openai only to ask would be slow.
    return any(kind.__name__ == "BaseAzureClient" for kind in type(client).__mro__)


# Headers the client sets for its own requests, not for the service.
_CLIENT_MADE_HEADERS = frozenset({"accept", "content-type", "user-agent"})
_SESSION_TTL_S = 3600.0
_FOREVER_S = 10 * 365 * 86400.0  # a history that never expires: its runner KV lives as long


def _as_backend(backend: object, model: str | None, session_ttl_s: float | None = None) -> Backend:
    if backend is None:  # its sessions' KV lives as long as their history
        return BundledRunner() if session_ttl_s is None else BundledRunner(session_ttl_s=session_ttl_s)
    if isinstance(backend, Backend):
        return backend
    if _is_llama_runner(backend):
        return BundledRunner(backend)  # type: ignore[arg-type]
    if _is_openai_client(backend):
        if model is None:
            raise ConfigError("an OpenAI client serves many models: pass model= (for example model='gpt-4o-mini')")
        return _from_openai_client(backend, model)
    if callable(backend):
        return Function(backend)
    raise ConfigError(
        f"backend must be a tokenguard.backends.Backend or a function, got {type(backend).__name__}"
    )


def _as_turn(message: object) -> list[dict[str, Any]]:
    if isinstance(message, str):
        return [{"role": "user", "content": message}]
    if isinstance(message, Mapping):
        return [dict(message)]
    if isinstance(message, Sequence) and not isinstance(message, bytes) and message:
        return [dict(check_message(i, m)) for i, m in enumerate(message)]
    raise InvalidRequest(
        f"a chat turn is a string, a message dict or a non-empty list of them, got {type(message).__name__}"
        + (" (empty)" if isinstance(message, Sequence) and not message else "")
    )


def _with_tag(tags: Any, tag: str) -> Any:
    """``tags`` with ``tag`` added, in the form they were given (see ``Ledger.report``)."""
    if tags is None or tags == "":
        return tag
    if isinstance(tags, Mapping):
        return {**tags, "tokenguard": tag}
    if isinstance(tags, (list, tuple)):
        return [*tags, tag]
    return [tags, tag]


def _check_caller(user: object, session: object) -> None:
    """``user`` and ``session`` are each None or a non-empty str: "" would be one scope
    (one budget, one chat history) shared by every caller who sends it; and text, which
    half of a UTF-16 pair is not (no store could file the call under it)."""
    for name, value in (("user", user), ("session", session)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidRequest(f"{name} must be a non-empty str or None, got {value!r}")
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{name} holds an unpaired UTF-16 surrogate (no text): {value!r}") from None


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
    a :class:`~tokenguard.runner.LlamaRunner` is served as it is; an ``openai.OpenAI``
    client becomes an :class:`~tokenguard.backends.OpenAICompatible` backend on its
    ``base_url`` and key (``model=`` says which model); a plain function is wrapped in
    :class:`~tokenguard.backends.Function`. ``model`` names the model for
    prices and the ledger, and the tokenizer for backends that do not report their own
    (default: the backend's model; a function's model must be given).

    ``max_input_tokens`` refuses longer inputs with :class:`~tokenguard.InputTooLong`;
    ``max_output_tokens`` caps every reply, on backends that ignore it too. ``budget``
    is a :class:`~tokenguard.Budget` or several; ``ledger`` a path or a
    :class:`~tokenguard.Ledger` (``None``: in memory, so ``guard.ledger`` always exists);
    ``prices`` sets ``{model: (usd_per_mtok_in, usd_per_mtok_out)}``. ``stop`` watches
    every reply for loops and ends a looping one (a :class:`~tokenguard.RepetitionStop`,
    on by default; ``None`` turns it off). ``context`` fits each call's messages into
    ``min(window - max_output_tokens, max_context_tokens)`` tokens, where the window is
    the backend's (the bundled runner's context length) and ``max_context_tokens`` your
    own limit; the default :class:`~tokenguard.context.TailOnly` keeps the system
    messages and the newest turns, and does nothing when neither bound is known.
    ``max_input_tokens`` caps what the caller sends (for :meth:`chat`, the new turn).
    A chat session's history expires ``session_ttl_s`` after its last use (``None``:
    never; the bundled runner the guard builds keeps the session's KV as long);
    :meth:`touch` is a heartbeat (for the history and the runner's KV) and
    :meth:`end_session` frees both at once.
    Calls nest: a guarded call made while another runs (inside a ``@guard`` function,
    in asyncio tasks it starts, in threads started with ``contextvars.copy_context()``)
    is its child, and its ledger row says so (``depth``, ``parent_id``, ``root_id``).
    ``scope`` trims what a child forwards: the default
    :class:`~tokenguard.pipeline.TrimForwarded` keeps the child's own new messages and
    the most relevant context its ancestors already sent, within a share (1/4) of its
    parent's input (see :func:`~tokenguard.scope`); ``scope=None`` sends everything and
    still links the tree. ``cache`` is a :mod:`tokenguard.cache` cache or a list of them,
    looked up in order after the prompt is fitted: a hit skips the backend and bills
    nothing (``reply.cached``, ``stop_reason`` ``"cache"``, the original cost in
    ``usage.saved_tokens`` / ``saved_usd``); complete replies are stored in each.
    ``remember`` plugs in a step of :mod:`tokenguard.pipeline`. ``telemetry`` sends each
    call's usage to OpenTelemetry in the GenAI semantic conventions
    (:mod:`tokenguard.telemetry`): ``"auto"`` (default) when ``opentelemetry-api`` is
    installed, to the global providers, which record nothing until you configure an SDK;
    ``False`` never; an :class:`~tokenguard.telemetry.OTelMeter` to its own providers.
    ``timeout`` bounds, in seconds, how long a call's backend may take from the start of
    its stream to its last piece: past it the stream ends with
    :class:`~tokenguard.BackendTimeout`, the call is metered as an error and its
    reservation released (``None``, the default: no limit of the guard's own).

    >>> guard = Guard(lambda messages: "hello", model="gpt-4o", max_output_tokens=16)
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
        scope: ScopeStep | None = _DEFAULT_SCOPE,
        context: ContextStrategy | None = _DEFAULT_CONTEXT,
        max_context_tokens: int | None = None,
        cache: CacheStep | Sequence[CacheStep] | None = None,
        remember: RememberStep | None = None,
        history: SessionHistory | None = None,
        session_ttl_s: float | None = _SESSION_TTL_S,
        telemetry: bool | str | OTelMeter | None = "auto",
        timeout: float | None = None,
    ) -> None:
        max_output_tokens = token_count("max_output_tokens", max_output_tokens)
        self.timeout = None if timeout is None else seconds("timeout", timeout)
        if history is not None and session_ttl_s != _SESSION_TTL_S:
            raise ConfigError("session_ttl_s is the history's: with history= pass SessionHistory(ttl_s=...) instead")
        history_ttl_s = history.ttl_s if history is not None else session_ttl_s
        self.backend: Backend = _as_backend(backend, model, _FOREVER_S if history_ttl_s is None else history_ttl_s)
        known = model or self.backend.model
        if known is None:
            raise ConfigError(
                "the guard cannot tell which model this function calls, so it could neither count "
                "its tokens nor price them: pass model= (for example Guard(fn, model='gpt-4o'))"
            )
        self.model: str = known
        self.max_output_tokens = max_output_tokens
        self.pricing = Pricing(prices)
        self.ledger: Ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self.budgets: list[Budget] = [] if budget is None else [budget] if isinstance(budget, Budget) else list(budget)
        if self.budgets and isinstance(self.backend, Function) and not self.backend.takes_max_tokens:
            fn = self.backend.fn
            raise ConfigError(
                f"{getattr(fn, '__qualname__', fn)}() takes no max_tokens, so the model it calls may "
                f"generate past the {max_output_tokens} output tokens the budget reserves and overspend "
                "it: add a max_tokens parameter and pass it on (create(..., max_tokens=max_tokens))"
            )
        if any(b.usd is not None for b in self.budgets) and not self.pricing.known(self.model):
            raise ConfigError(
                f"a budget limits USD but no price is known for model {self.model!r}: set "
                f"prices={{{self.model!r}: (usd_per_mtok_in, usd_per_mtok_out)}} on the Guard"
            )
        # A hold this process leaves by dying after its call's row is written is settled from that row.
        link_ledger(self.budgets, self.ledger)
        self.history = history if history is not None else SessionHistory(ttl_s=session_ttl_s)
        if self.history.on_expire is None:  # what expires is freed everywhere the guard keeps it
            self.history.on_expire = self._forget_session
        self._tokenizer_spec = tokenizer
        self._tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self._tokenizer_lock = threading.Lock()

        # The pipeline, in order. None = the step is absent.
        self.admit: Admit | None = Admit(max_input_tokens) if max_input_tokens is not None else None
        self.scope = scope
        self.fit: FitStep | None = (
            Fit(context, max_context_tokens=max_context_tokens, side_call=self._side_call)
            if context is not None
            else None
        )
        self.caches: list[CacheStep] = [] if cache is None else [cache] if isinstance(cache, CacheStep) else list(cache)
        self.reserve: Reserve | None = Reserve(self.budgets, self.pricing) if self.budgets else None
        self.watchers: list[ChunkWatcher] = [OutputCap(), *([stop] if stop is not None else [])]
        from tokenguard.telemetry import telemetry_observer  # loaded with the first guard, as the runner is

        self.telemetry: OTelMeter | None = telemetry_observer(telemetry)
        self.meter = Meter(self.ledger, self.pricing, [self.telemetry] if self.telemetry is not None else [])
        self.settle: Settle | None = Settle() if self.budgets else None
        self.remember: list[RememberStep] = [
            RememberTurn(self.history), *(c.store for c in self.caches), *([remember] if remember else [])
        ]
        # Whether no step can wait on I/O or heavy work (see can_run_inline); the first
        # call always runs in a worker thread, which loads the tokenizer and prices.
        self._steps_never_block = (
            scope is _DEFAULT_SCOPE and remember is None and not self.caches
            and (context is None or type(context) is TailOnly)
            and isinstance(self.backend, (Function, OpenAICompatible))
            and isinstance(self.ledger.store, MemoryLedgerStore)
            and all(isinstance(b.store, MemoryBudgetStore) for b in self.budgets)
            and self.history.in_process
        )
        self._opened_once = False

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
        replaces the guard's for this call. The call is placed in the call tree here:
        prepared while another guarded call runs, it is that call's child."""
        messages = as_messages(prompt_or_messages)
        _check_caller(user, session)
        if "max_completion_tokens" in params:  # OpenAI's newer name for the same cap
            if "max_tokens" in params:
                raise InvalidRequest("pass max_tokens or max_completion_tokens, not both")
            params["max_tokens"] = params.pop("max_completion_tokens")
        max_out = _max_tokens(params.pop("max_tokens", None), self.max_output_tokens)
        params["max_tokens"] = max_out
        backend = backend or self.backend
        if session is not None and backend.accepts_session:
            params["session"] = session
        if user is not None and getattr(backend, "accepts_user", False):
            params["user"] = user
        if tags is not None and getattr(backend, "accepts_tags", False):
            params["tags"] = tags
        check_params = getattr(backend, "check_params", None)
        if check_params is not None:
            check_params(params)
        backend.warmup()  # a model's first load is not part of this call's latency
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
            outer=current_frame(),
        )

    def open_stream(self, call: Call) -> GuardStream:
        """Run a prepared call: admission, cache and budgets now, before the backend is
        called; generation as the stream is read; meter, settle and remember when it ends."""
        return GuardStream(self._open(call, lambda: iter(call.backend.stream(call.messages, call.params))))

    def open_astream(self, call: Call | Callable[[], Call], *, inline: bool = False) -> AsyncGuardStream:
        """The async twin of :meth:`open_stream`. The stream opens on its first
        iteration, in a worker thread; ``call`` may be a function that prepares the
        call, so that preparing (a tokenizer's or a model's first load) runs there too.
        ``inline=True`` runs the steps on the event loop instead, for a call
        :meth:`can_run_inline` allows."""

        def open_() -> Opened:
            prepared = call if isinstance(call, Call) else call()
            return self._open(
                prepared, lambda: aiter(prepared.backend.astream(prepared.messages, prepared.params))
            )

        return AsyncGuardStream(open_, inline=inline)

    def can_run_inline(self, prompt_or_messages: object) -> bool:
        """Whether an async call with this input may run the guard's steps (admission, counting,
        budgets, the ledger) on the event loop rather than in worker threads, which
        costs two thread hand-offs a call (more CPU than the steps themselves). Only
        when none of them can wait: every budget, the ledger and the histories in this
        process, no cache and no context strategy but
        :class:`~tokenguard.context.TailOnly`, a backend that loads no model, a prompt
        under 16,000 characters, not nested in another guarded call, and after this
        guard's first call (which loads the tokenizer). Meter observers run inline too:
        give an OpenTelemetry SDK a batching span processor."""
        return (
            self._steps_never_block and self._opened_once and current_frame() is None
            and _text_size(prompt_or_messages, _INLINE_MAX_CHARS) < _INLINE_MAX_CHARS
        )

    def _open(self, call: Call, open_chunks: Callable[[], Iterator[Chunk] | AsyncIterator[Chunk]]) -> Opened:
        if call.opened:
            raise InvalidRequest(
                f"call {call.request_id} has run already: prepare a new Call for each run "
                "(its request_id names one ledger row and one budget hold)"
            )
        call.opened = True
        given = call.messages  # the steps replace the list, never change it
        self._opened_once = True
        if self.telemetry is not None:  # before the steps: a summary they ask for is a call it makes
            self.telemetry.started(call)  # the spans of the calls it makes wait for its span
        hit = self._before(call)
        if hit is not None:
            self._remember(call, hit)
            return Opened(call.request_id, reply=hit)
        on_end = functools.partial(self._finish, call)
        generation: Generation | None = None
        try:  # the call holds its budgets now: whatever fails ends it
            generation = Generation([watcher.watch(call) for watcher in self.watchers])
            # The backend runs in the call's frame, so guarded calls it makes are its children.
            frame = running_frame(call, given) if call.messages is given else running_frame(call, given, call.messages)
            chunks = framed(frame, open_chunks)
            if self.timeout is not None:
                chunks = with_deadline(chunks, self.timeout)
        except BaseException as error:
            on_end(generation.outcome(error) if generation is not None else Outcome.refused(error))
            raise
        return Opened(call.request_id, chunks, generation, on_end)

    def _before(self, call: Call) -> Reply | None:
        """Steps admit..reserve; a cache hit is metered and returned. A refusal is
        metered (no tokens) and re-raised."""
        try:
            if not call.side:
                if self.admit is not None:
                    self.admit(call)
                if self.scope is not None:
                    self.scope(call)
                if self.fit is not None:
                    self.fit(call)
            # Count the prompt now: a prompt that cannot be counted is refused here, before
            # anything is spent, rather than metered as 0 tokens after the backend ran.
            call.count_input()
            for cache in self.caches:  # in order: the first hit answers
                hit = cache.lookup(call)
                if hit is not None:
                    self.meter.add_spared_input(call, hit.usage)
                    self.meter(call, hit.usage, hit.stop_reason, cached=True)
                    return hit
            if self.reserve is not None:
                self.reserve(call)
        except BaseException as error:
            try:
                self._finish(call, Outcome.refused(error))
            except Exception:  # its row failed too (a store that is down): say why it was refused
                logger.warning("call %s: its refusal could not be recorded", call.request_id, exc_info=True)
                raise error from None
            raise
        return None

    def _finish(self, call: Call, outcome: Outcome) -> Reply:
        """Steps meter, settle and remember: once per call, whatever happened. A count
        that fails is recorded in the call's row and then raised: a ledger never says
        0 tokens for a call that had them without saying why."""
        failed_before = outcome.error
        usage = self.meter.usage(call, outcome)
        reply = Reply(
            text=outcome.text,
            stop_reason=outcome.stop_reason,
            messages=call.messages,
            usage=usage,
            request_id=call.request_id,
            model=call.model,
            tool_calls=outcome.tool_calls,
        )
        try:
            self.meter(call, usage, outcome.stop_reason, outcome.error)
        except StoreError as e:
            if outcome.succeeded:
                e.reply = reply  # the answer is not lost with the row
            raise
        finally:
            if self.settle is not None:
                self.settle(call, usage)
        if outcome.error is not None and outcome.error is not failed_before:
            raise outcome.error
        if outcome.succeeded:
            self._remember(call, reply)
        return reply

    def _remember(self, call: Call, reply: Reply) -> None:
        for step in self.remember:
            step(call, reply)

    def _side_call(self, parent: Call, messages: list[dict[str, Any]], max_tokens: int, backend: Any, tag: str) -> str:
        """A model call made on ``parent``'s behalf (a context strategy's summary): a
        call of its own in the ledger, tagged ``tag``, for the same user and session and
        against the same budgets; ``backend=None`` asks the guard's own backend."""
        backend = self.backend if backend is None else _as_backend(backend, None)
        window = self.fit.window if isinstance(self.fit, Fit) and backend is self.backend else None
        if window is not None:  # the summary it asks for must fit the window beside its prompt
            max_tokens = max(1, min(max_tokens, window - parent.tokenizer.count_messages(messages)))
        call = self.prepare(
            messages,
            user=parent.user,
            session=parent.session,
            tags=_with_tag(parent.tags, tag),
            backend=backend,
            max_tokens=max_tokens,
        )
        call.params.pop("session", None)  # its own prompt: it must not take over the session's KV cache
        call.side = True
        call.outer = running_frame(parent, parent.messages)  # a child of the call it serves, in the tree
        if backend is not self.backend and backend.model is not None:
            call.model = backend.model
        return self.open_stream(call).read().text

    def _forget_session(self, session: str) -> None:
        """Free what the backend and the context strategy keep for ``session``."""
        try:
            self.backend.end_session(session)
        finally:
            if isinstance(self.fit, Fit):
                self.fit.end_session(session)

    # -- public API ---------------------------------------------------------------------
    #
    # Sessions: ``session=`` on every method names the session for the ledger, for
    # per-session budgets and for the bundled runner's KV reuse. Only the chat methods
    # also carry the session's history: they send its earlier turns with the new
    # message and add the turn and its reply to it when the call succeeds.

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
        before the backend is called. Use it as a context manager (``with
        guard.stream(...) as s``) when you may stop early: leaving the block closes the
        backend and settles the budget at once, not when the stream is collected."""
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

    def chat_stream(
        self,
        message: Turn,
        *,
        session: str,
        user: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> GuardStream:
        """:meth:`chat`, streamed: the session's history goes along, and the turn is
        added to it when the stream ends well."""
        return self.open_stream(self._chat_call(message, session, user, tags, params))

    def chat(
        self,
        message: Turn,
        *,
        session: str,
        user: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> Reply:
        """Send ``message`` in ``session``, whose earlier turns go along with it; the
        turn and its reply are added to the session's history when the call succeeds.

        A reply that calls tools (``reply.tool_calls``) is kept with its calls; send
        their results as the next turn, a ``{"role": "tool", "tool_call_id": ...,
        "content": ...}`` message each (a list of them when it called several)."""
        return self.chat_stream(message, session=session, user=user, tags=tags, **params).read()

    def _chat_call(
        self, message: object, session: str, user: str | None, tags: Any, params: dict[str, Any]
    ) -> Call:
        turn = _as_turn(message)
        if session is None:
            raise InvalidRequest("a chat needs session=: its history is the session's (for one call, use complete)")
        _check_caller(user, session)
        sent = answered_calls_only([*self.history.get(session), *turn])
        call = self.prepare(sent, user=user, session=session, tags=tags, **params)
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
        """The async twin of :meth:`stream`: ``async for piece in guard.astream(...)``.
        Nothing blocks the event loop: the call is prepared, admitted and reserved in a
        worker thread on the first iteration, which also raises any refusal."""
        return self.open_astream(
            functools.partial(self.prepare, prompt_or_messages, user=user, session=session, tags=tags, **params),
            inline=self.can_run_inline(prompt_or_messages),
        )

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

    def achat_stream(
        self,
        message: Turn,
        *,
        session: str,
        user: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> AsyncGuardStream:
        """The async twin of :meth:`chat_stream`."""
        return self.open_astream(functools.partial(self._chat_call, message, session, user, tags, params))

    async def achat(
        self,
        message: Turn,
        *,
        session: str,
        user: str | None = None,
        tags: Any = None,
        **params: Any,
    ) -> Reply:
        """The async twin of :meth:`chat`."""
        return await self.achat_stream(message, session=session, user=user, tags=tags, **params).aread()

    def touch(self, session: str) -> bool:
        """Keep ``session``'s history alive without a call (a heartbeat), and what the
        backend keeps for it (the bundled runner's KV); ``False`` when it is unknown or
        has expired."""
        alive = self.history.touch(session)
        touch = getattr(self.backend, "touch_session", None)
        if alive and touch is not None:
            touch(session)
        return alive

    def end_session(self, session: str) -> None:
        """Forget ``session`` now: its chat history, what the backend keeps for it (the
        bundled runner's KV blocks) and what the context strategy keeps (a summary, an
        index of turns)."""
        self.history.clear(session)
        self._forget_session(session)

    def warmup(self) -> None:
        """Load now what the first call would otherwise wait for: the backend's model,
        the tokenizer the guard counts with, and the embedding model of a semantic cache
        or a retrieval strategy."""
        self.backend.warmup()
        _ = self.tokenizer
        strategy = self.fit.strategy if isinstance(self.fit, Fit) else None
        for step in (*self.caches, strategy):
            warmup = getattr(step, "warmup", None)
            if warmup is not None:
                warmup()

    def close(self) -> None:
        """Release what the guard holds open: the backend's connections or model, the
        ledger's and the session history's database connections (a later call opens
        them again). Also what leaving ``with Guard(...) as guard:`` does. Budgets may be
        shared by guards still running: each has its own :meth:`Budget.close`."""
        close = getattr(self.backend, "close", None)
        try:
            if close is not None:
                close()
        finally:
            try:
                self.history.close()
            finally:
                self.ledger.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Guard({self.backend!r}, model={self.model!r})"

