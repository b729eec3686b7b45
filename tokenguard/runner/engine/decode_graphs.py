"""Decode steps at fixed shapes, captured once per shape in CUDA graphs and replayed.

On a GPU a small model's decode step is launch-bound: a forward is hundreds of small
kernels, and launching them from Python costs more than running them. A step in which
every sequence decodes one token is therefore run at a fixed shape - the batch padded
to a bucket size, every context padded to a bucket length - so the whole forward can be
captured once per (batch, context) bucket and replayed with one launch. The host
prepares one small integer buffer per step (token ids, context lengths, block tables)
and copies it to the device in one transfer.

Padding rows decode token 0 over a one-token context in the pool's spare block, which no
sequence owns; padded context positions are masked out. Buckets are captured lazily,
the first time a batch needs them (tens of milliseconds each), and share one memory
pool: steps replay one at a time, in the engine thread.

Prompt chunks, and steps that mix them with decoding, run eagerly through
:class:`~tokenguard.runner.engine.paged_cache.PagedKVCache`.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenguard.runner.engine.paged_cache import PagedKVCache
from tokenguard.runner.model import LlamaModel

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIN_CONTEXT_BUCKET = 256
MAX_CONTEXT_BUCKET = 8192  # longer contexts decode eagerly: their gather dwarfs the launches


class FixedShapeDecode:
    """One (batch, context) bucket: its input buffers, and on CUDA the graph that reads them.

    Also the KV-cache object the model's attention talks to during the step (see
    :class:`~tokenguard.runner.model.kv_cache.KVCache`): it writes each sequence's new
    keys and values into its slot and attends over the gathered, padded contexts.
    """

    def __init__(self, model: LlamaModel, cache: PagedKVCache, batch: int, context: int) -> None:
        self.model, self.cache = model, cache
        self.batch, self.context = batch, context
        device = cache.device
        width = context // cache.block_size
        # One buffer, filled by one host-to-device copy per step: ids, lengths, block tables.
        self.inputs = torch.zeros(batch * (2 + width), dtype=torch.long, device=device)
        self.staging = torch.zeros(self.inputs.shape, dtype=torch.long, pin_memory=device.type == "cuda")
        self.ids = self.inputs[:batch]
        self.lengths = self.inputs[batch : 2 * batch]
        self.tables = self.inputs[2 * batch :].view(batch, width)
        self._offsets = torch.arange(cache.block_size, device=device)
        self._context_positions = torch.arange(context, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output
        # Set by _forward for attend():
        self._index = self._write = self._mask = torch.empty(0)

    def load(self, ids: Sequence[int], lengths: Sequence[int], tables: Sequence[Sequence[int]]) -> None:
        """Fill the input buffer: real rows first, padding rows after."""
        spare = self.cache.spare_block
        width = self.tables.shape[1]
        pad = self.batch - len(ids)
        rows = [[*table, *[spare] * (width - len(table))] for table in tables]
        rows += [[spare] * width] * pad
        values = [*ids, *[0] * pad, *lengths, *[1] * pad]
        self.staging[: 2 * self.batch] = torch.tensor(values)
        self.staging[2 * self.batch :] = torch.tensor(rows).view(-1)
        self.inputs.copy_(self.staging, non_blocking=True)

    def run(self) -> torch.Tensor:
        """Float32 logits ``[batch, vocab]`` of the loaded step."""
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            return self.logits
        return self._forward()

    def capture(self, pool: _POOL_HANDLE | None) -> None:
        """Capture the step in a CUDA graph (after warming up on a side stream, as
        capture requires). The loaded inputs must be a real step: the warm-up runs
        write the same keys and values that the step itself will."""
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = self._forward()
        self.graph = graph

    def _forward(self) -> torch.Tensor:
        positions = self.lengths - 1
        size = self.cache.block_size
        self._index = (self.tables[:, :, None] * size + self._offsets).view(self.batch, self.context)
        self._write = self._index.gather(1, positions[:, None]).squeeze(1)
        # Additive, in the attention dtype, made once per step rather than from a boolean mask in every layer.
        padding = self._context_positions[None, :] >= self.lengths[:, None]
        self._mask = torch.zeros(padding.shape, dtype=self.model.dtype, device=padding.device).masked_fill(
            padding, float("-inf"))[:, None, None, :]
        hidden = self.model(self.ids, positions, self)
        return self.model.compute_logits(hidden)

    def decode_slots(self) -> None:
        """Never the native (CPU) decode step: these steps are captured for CUDA graphs."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's ``k``/``v [B, kv_heads, D]`` and attend ``q [B, heads, D]``
        over each row's context (query heads sharing a KV head in the query-length dim,
        so grouped-query attention copies no K/V)."""
        keys, values = self.cache.k[layer], self.cache.v[layer]  # [kv_heads, slots, D]
        keys.index_copy_(1, self._write, k.transpose(0, 1))
        values.index_copy_(1, self._write, v.transpose(0, 1))
        batch, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        flat = self._index.view(-1)
        context_k = keys.index_select(1, flat).view(kv_heads, batch, self.context, head_dim).transpose(0, 1)
        context_v = values.index_select(1, flat).view(kv_heads, batch, self.context, head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.view(batch, kv_heads, num_heads // kv_heads, head_dim),
                                             context_k, context_v, attn_mask=self._mask)
        return out.reshape(batch, num_heads, head_dim)


class DecodeGraphs:
    """The engine's fast path for all-decode steps: picks a bucket, loads it, replays it.

    ``capture=False`` runs the same fixed-shape step eagerly (any device); the engine
    captures on CUDA only.
    """

    def __init__(self, model: LlamaModel, cache: PagedKVCache, *, max_batch: int, max_context: int,
                 capture: bool) -> None:
        self.model, self.cache = model, cache
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        size = cache.block_size
        top = -(-min(max_context, MAX_CONTEXT_BUCKET) // size) * size  # whole blocks
        self.context_buckets = [c for c in _powers_of_two(MIN_CONTEXT_BUCKET, top) if c < top] + [top]
        self.capture = capture
        self._steps: dict[tuple[int, int], FixedShapeDecode] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, num_sequences: int, longest: int) -> bool:
        """Whether a decode step of ``num_sequences`` with contexts up to ``longest`` tokens
        (the new one included) has a bucket."""
        return num_sequences <= self.batch_buckets[-1] and longest <= self.context_buckets[-1]

    def run(self, ids: Sequence[int], lengths: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Float32 logits ``[len(ids), vocab]`` of a decode step: each row's new token
        ``ids[i]`` at position ``lengths[i] - 1``, its context in blocks ``tables[i]``."""
        batch = self.batch_buckets[bisect.bisect_left(self.batch_buckets, len(ids))]
        context = self.context_buckets[bisect.bisect_left(self.context_buckets, max(lengths))]
        size = self.cache.block_size
        tables = [table[: -(-length // size)] for table, length in zip(tables, lengths, strict=True)]
        step = self._steps.get((batch, context))
        if step is None:
            step = self._steps[batch, context] = FixedShapeDecode(self.model, self.cache, batch, context)
            step.load(ids, lengths, tables)
            if self.capture:
                start = time.perf_counter()
                step.capture(self._pool)
                logger.debug("captured the decode step for %d sequences x %d tokens in %.0f ms",
                             batch, context, (time.perf_counter() - start) * 1000)
        else:
            step.load(ids, lengths, tables)
        return step.run()[: len(ids)]


def _powers_of_two(low: int, high: int) -> list[int]:
    values = [low]
    while values[-1] < high:
        values.append(values[-1] * 2)
    return values
