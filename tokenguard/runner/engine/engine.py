"""The serving loop: one background thread steps the model over a continuous batch.

Callers submit a prompt and get a :class:`Sequence` whose events arrive through the
callback they gave; the thread admits requests (after an admission window when the
engine was busy moments ago), runs one forward per step over every scheduled token
of every sequence, samples, and frees or keeps each finished sequence's KV blocks.
``LlamaRunner`` runs it in an engine process of its own
(:mod:`tokenguard.runner.engine_process`), which sends each step's events in one message.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from tokenguard.errors import ConfigError, TokenGuardError
from tokenguard.runner.engine.block_manager import BlockManager
from tokenguard.runner.engine.decode_graphs import DecodeGraphs
from tokenguard.runner.engine.paged_cache import PagedKVCache, SequenceSlice
from tokenguard.runner.engine.scheduler import Scheduler
from tokenguard.runner.engine.sequence import Sequence, Status
from tokenguard.runner.engine.sessions import SessionStore
from tokenguard.runner.model import LlamaModel
from tokenguard.runner.sampling import Sampler, SamplingParams, sample

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16
_DEFAULT_CPU_KV_BYTES = 1 << 30
# How long a step that could schedule nothing waits before it looks again (a change
# wakes it at once).
_STALLED_WAIT_S = 0.05


# Running engines. At interpreter exit their threads are stopped first: a
# daemon thread still inside a torch kernel while Python tears down aborts the process.
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    for engine in list(_live_engines):
        engine.shutdown()


class KVCacheTooSmall(TokenGuardError, ValueError):
    """A single request needs more KV slots than the whole pool has."""


def check_fits(prompt_len: int, max_tokens: int, capacity_tokens: int) -> None:
    """Raise :class:`KVCacheTooSmall` when one request could never fit the KV pool."""
    if prompt_len + max_tokens > capacity_tokens:
        raise KVCacheTooSmall(
            f"a prompt of {prompt_len} tokens plus max_tokens={max_tokens} needs more than the "
            f"KV cache's {capacity_tokens} token slots; raise kv_cache_bytes or lower max_tokens"
        )


def default_kv_cache_bytes(device: torch.device) -> int:
    """1 GiB (at most a tenth of RAM) on CPU; 40% of free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(_DEFAULT_CPU_KV_BYTES, ram // 10)
    except (ValueError, OSError, AttributeError):
        return _DEFAULT_CPU_KV_BYTES


def admission_deadline(first_arrival: float, idle_since: float, num_waiting: int, window_s: float,
                       last_peak: int) -> float:
    """When an idle engine should start on its waiting requests.

    Normally ``window_s`` after the first arrival, so a burst batches together. At low
    load - one request waits, and the engine had been idle longer than the window or
    ran one sequence at a time when last busy (``last_peak``, as a client sending one
    request after another does) - at once: a lone request pays no latency for company
    that is not coming.
    """
    if num_waiting == 1 and (first_arrival - idle_since > window_s or last_peak <= 1):
        return first_arrival
    return first_arrival + window_s


class Engine:
    """Continuous batching over one model, with a paged KV cache and session reuse."""

    def __init__(self, build_model: Callable[[], LlamaModel], *, batch_window_ms: float = 50,
                 session_ttl_s: float = 600.0, kv_cache_bytes: int | None = None,
                 max_batched_tokens: int | None = None, max_running: int | None = None,
                 cuda_graphs: bool = True, on_step: Callable[[], None] | None = None) -> None:
        """Start the engine thread, which builds the model with ``build_model`` and then
        serves. Every parallel torch operation on the model runs in that one thread:
        with OpenMP, a second thread's parallel work runs at about half speed once
        another thread of the process has run some.

        ``max_batched_tokens`` (tokens per step) and ``max_running`` (sequences per step)
        default to 512 and 64 on CPU, 2048 and 256 on CUDA. ``cuda_graphs`` replays
        decode steps from CUDA graphs (see :mod:`.decode_graphs`); False runs every step
        eagerly. It has no effect on CPU. ``on_step`` is called in the engine thread,
        outside the lock, after each step's events were emitted and after the last ones
        at shutdown: the engine process sends a step's events as one message from it."""
        self.batch_window_s = batch_window_ms / 1000
        self.sessions = SessionStore(session_ttl_s)
        self._settings = (kv_cache_bytes, max_batched_tokens, max_running, cuda_graphs)
        self._on_step = on_step or (lambda: None)
        self.decode_graphs: DecodeGraphs | None = None
        self._cv = threading.Condition()
        self._in_flight: set[int] = set()
        self._idle_since = time.monotonic()
        self._peak_running = self._last_peak = 0  # most sequences at once: this busy spell, the last one
        self._closed = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(build_model,), name="tokenguard-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        _live_engines.add(self)

    def _start(self, build_model: Callable[[], LlamaModel]) -> None:
        """Build the model and size the KV pool (in the engine thread)."""
        kv_cache_bytes, max_batched_tokens, max_running, cuda_graphs = self._settings
        self.model = model = build_model()
        config = model.config
        self.device = model.inv_freq.device
        on_cuda = self.device.type == "cuda"
        max_batched_tokens = max_batched_tokens or (2048 if on_cuda else 512)
        max_running = max_running or (256 if on_cuda else 64)
        per_token = PagedKVCache.bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim, model.dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(self.device)
        num_blocks = budget // (per_token * BLOCK_SIZE)
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_bytes={budget} holds no block of {BLOCK_SIZE} tokens ({per_token} B each)")
        start = time.perf_counter()
        self.cache = PagedKVCache(config.num_layers, config.num_kv_heads, config.head_dim, num_blocks, BLOCK_SIZE,
                                  model.dtype, self.device)
        logger.debug("KV cache: %d blocks of %d tokens (%d token slots, %.0f MiB) on %s, allocated in %.1f s",
                     num_blocks, BLOCK_SIZE, num_blocks * BLOCK_SIZE, num_blocks * BLOCK_SIZE * per_token / 2**20,
                     self.device, time.perf_counter() - start)
        self.scheduler = Scheduler(BlockManager(num_blocks, BLOCK_SIZE), self.sessions, self.cache.copy_slots,
                                   max_batched_tokens=max_batched_tokens, max_running=max_running)
        if cuda_graphs and on_cuda:
            self.decode_graphs = DecodeGraphs(model, self.cache, max_batch=max_running,
                                              max_context=min(config.max_position_embeddings,
                                                              self.scheduler.capacity_tokens),
                                              capture=True)

    def _run(self, build_model: Callable[[], LlamaModel]) -> None:
        try:
            self._start(build_model)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
            self._start_error = e
            return
        finally:
            self._ready.set()
        self._loop()

    @property
    def capacity_tokens(self) -> int:
        """Token slots in the KV pool: no single request may need more."""
        return self.scheduler.capacity_tokens

    # -- caller side ----------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_token_ids: frozenset[int],
               emit: Callable[[tuple[str, Any]], None], session: str | None = None) -> Sequence:
        """Queue a request; its events go to ``emit`` from the engine thread."""
        check_fits(len(prompt_ids), params.max_tokens, self.capacity_tokens)
        seq = Sequence(len(prompt_ids), list(prompt_ids), params, stop_token_ids, emit, session)
        with self._cv:
            if self._closed:
                raise TokenGuardError("the engine is shut down")
            self.scheduler.add(seq)
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence, *, keep_session: bool = False) -> None:
        """Stop ``seq`` and free its blocks (or, with ``keep_session``, hand them to its
        session, as when a stop string ends the reply); returns once that is done."""
        with self._cv:
            if seq.status is Status.FINISHED:
                return
            seq.cancelled = True
            seq.keep_session_on_cancel = keep_session
            if seq.seq_id not in self._in_flight:
                self.scheduler.finish(seq, keep_session=keep_session)
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            seq.released.wait(timeout=30)

    def touch(self, session: str) -> bool:
        with self._cv:
            return self.sessions.touch(session)

    def end_session(self, session: str) -> None:
        with self._cv:
            self.scheduler.blocks.release(self.sessions.end(session))

    def stats(self) -> dict[str, int]:
        with self._cv:
            self._expire_sessions()
            blocks = self.scheduler.blocks
            return {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": blocks.num_blocks,
                "kv_blocks_free": blocks.num_free,
                "kv_block_size": blocks.block_size,
                "sessions": len(self.sessions),
                "prefix_tokens_reused": self.scheduler.prefix_tokens_reused,
                "preemptions": self.scheduler.preemptions,
            }

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- engine thread --------------------------------------------------------------------

    def _expire_sessions(self) -> None:
        self.scheduler.blocks.release(self.sessions.expire(self.scheduler.active_sessions()))

    def _loop(self) -> None:
        while True:
            try:
                serving = self._step()
            except Exception as e:  # noqa: BLE001 - a failed step must not leave its callers waiting forever
                with self._cv:
                    self._in_flight = set()
                    self._fail_all(TokenGuardError(f"the engine failed a step: {type(e).__name__}: {e}"))
                serving = True
            if not serving:
                break
            self._on_step()
        self._on_step()

    def _step(self) -> bool:
        """One step: wait for work, schedule, forward, sample. False once shut down."""
        with self._cv:
            while not self.scheduler.has_work() and not self._closed:
                self._expire_sessions()
                self._cv.wait(timeout=self.sessions.next_expiry())
            if self._closed:
                self._fail_all(TokenGuardError("the engine shut down"))
                return False
            self._admission_window()
            batch = self.scheduler.schedule()
            if not batch:  # nothing can run until a request ends, is cancelled or comes: wait, not spin
                self._cv.wait(timeout=_STALLED_WAIT_S)
                return True
            self._peak_running = max(self._peak_running, len(self.scheduler.running))
            self._in_flight = {seq.seq_id for seq, _ in batch}
        try:
            logits = self._forward(batch)
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the engine
            with self._cv:
                self._in_flight = set()
                for seq, _ in batch:
                    seq.emit(("error", e))
                    self.scheduler.finish(seq, keep_session=False)
            return True
        with self._cv:
            self._in_flight = set()
            self._advance(batch, logits)
            if not self.scheduler.has_work():
                self._idle_since = time.monotonic()
                self._last_peak, self._peak_running = self._peak_running, 0
        return True

    def _admission_window(self) -> None:
        """At an idle engine, wait up to the window so that requests arriving together
        run together (see :func:`admission_deadline`)."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        deadline = admission_deadline(self.scheduler.waiting[0].arrival, self._idle_since,
                                      len(self.scheduler.waiting), self.batch_window_s, self._last_peak)
        while not self._closed and len(self.scheduler.waiting) < self.scheduler.max_running:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cv.wait(timeout=remaining)

    @torch.inference_mode()
    def _forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Float32 logits ``[sampling sequences, vocab]`` of one step over ``batch``."""
        graphs = self.decode_graphs
        if graphs is not None and all(n == seq.num_uncached == 1 for seq, n in batch) and graphs.fits(
                len(batch), max(len(seq.tokens) for seq, _ in batch)):
            return graphs.run([seq.tokens[-1] for seq, _ in batch], [len(seq.tokens) for seq, _ in batch],
                              [seq.block_table for seq, _ in batch])
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        sample_rows: list[int] = []
        for seq, n in batch:
            start = seq.num_cached
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            slices.append(SequenceSlice(seq.block_table, start, n))
            if start + n == len(seq.tokens):
                sample_rows.append(len(ids) - 1)
        self.cache.prepare(slices)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, torch.tensor(positions, device=self.device), self.cache)
        return self.model.compute_logits(hidden[sample_rows])

    def _advance(self, batch: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        sampling: list[Sequence] = []  # in the order of the logits rows
        samplers: list[Sampler] = []
        for seq, n in batch:
            seq.num_cached += n
            if seq.num_cached < len(seq.tokens):
                continue  # a prompt chunk: the prompt is not finished yet
            if seq.sampler is None:
                seq.sampler = Sampler(seq.params, self.model.config.vocab_size, seq.tokens[: seq.prompt_len],
                                      self.device)
            sampling.append(seq)
            samplers.append(seq.sampler)
        # The whole batch is sampled together: one host sync per step, not one per sequence.
        tokens = sample(samplers, logits) if sampling else []
        for seq, token in zip(sampling, tokens, strict=True):
            if seq.cancelled:
                self.scheduler.finish(seq, keep_session=seq.keep_session_on_cancel)
                continue
            seq.tokens.append(token)
            seq.emit(("token", token))
            if token in seq.stop_token_ids:
                self._finish(seq, "stop")
            elif seq.num_generated >= seq.params.max_tokens:
                self._finish(seq, "length")
        for seq, _ in batch:  # cancelled mid-prompt
            if seq.cancelled and seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, keep_session=seq.keep_session_on_cancel)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, keep_session=True)
        seq.emit(("finish", reason))

    def _fail_all(self, error: Exception) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            seq.emit(("error", error))
            self.scheduler.finish(seq, keep_session=False)

