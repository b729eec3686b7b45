"""Keys and values of many sequences in one pre-allocated pool of blocks.

The pool is ``[layers, kv_heads, (num_blocks + 1) * block_size, head_dim]``: a token's
slot is ``block * block_size + offset``; the last block is a spare that no sequence
owns, where the padding rows of fixed-shape steps write. Before each forward the scheduler describes the
flat batch with :meth:`PagedKVCache.prepare` - for every sequence, in batch order,
its block table, how many tokens are already cached and how many are new - and each
layer's :meth:`attend` writes the new keys and values into their slots, reads every
sequence's context and runs ``scaled_dot_product_attention`` over it.

A context whose blocks are consecutive in the pool (the common case: blocks are
handed out in order) is read as a view, with no copy; others are gathered. Decoding
sequences are attended together as one padded batch (no mask when there is one);
prompt chunks one by one with a causal mask offset by their cached prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenguard.runner.model.kv_cache import DecodeSlots, attend_one


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's part of a forward: its blocks, cached tokens and new tokens."""

    block_table: Sequence[int]
    cached: int  # tokens already in the cache before this step
    new: int  # tokens this step adds (1 when decoding)


Context = slice | torch.Tensor  # pool slots of a sequence's tokens: a range, or gathered


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU its memory comes from ``calloc`` (through numpy), whose
    large blocks are pages the kernel zeroes when first touched: a 1 GiB pool costs
    resident memory only for the blocks sequences have used, not all of it at once."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.empty(0, dtype=dtype).element_size()
    for n in shape:
        size *= n
    return torch.from_numpy(np.zeros(size, dtype=np.uint8)).view(dtype).view(shape)


class PagedKVCache:
    """The KV pool, and the layout of the current forward's flat batch."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.k = _zeros(shape, dtype, torch.device(device))
        self.v = _zeros(shape, dtype, torch.device(device))
        self.block_size = block_size
        self.spare_block = num_blocks  # owned by no sequence (see the module docstring)
        self.device = torch.device(device)
        self._write: Context = slice(0, 0)
        self._prefills: list[tuple[int, int, int, Context]] = []  # (first row, new, cached, context)
        self._decode_rows: list[int] = []
        self._decode_contexts: list[Context] = []
        self._decode_mask: torch.Tensor | None = None
        self._decode_lengths: torch.Tensor | None = None  # of several decoding sequences

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Pool bytes one cached token takes (keys and values, every layer)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def copy_slots(self, source_block: int, target_block: int, count: int) -> None:
        """Copy the keys and values of the first ``count`` slots of a block, every layer."""
        source, target = source_block * self.block_size, target_block * self.block_size
        self.k[:, :, target : target + count] = self.k[:, :, source : source + count]
        self.v[:, :, target : target + count] = self.v[:, :, source : source + count]

    def slots(self, block_table: Sequence[int], start: int, end: int) -> Context:
        """Pool slots of token positions ``start..end`` of a sequence with ``block_table``."""
        size = self.block_size
        first, last = start // size, (end - 1) // size
        base = block_table[first]
        if all(block_table[i] == base + i - first for i in range(first, last + 1)):
            begin = base * size + start % size
            return slice(begin, begin + end - start)
        positions = torch.arange(start, end)
        blocks = torch.as_tensor(block_table, dtype=torch.long)[positions // size]
        return (blocks * size + positions % size).to(self.device)

    def prepare(self, batch: Sequence[SequenceSlice]) -> None:
        """Describe the next forward: ``batch`` in the order its tokens are laid out."""
        writes: list[Context] = []
        self._prefills, self._decode_rows, self._decode_contexts = [], [], []
        row = 0
        for part in batch:
            total = part.cached + part.new
            writes.append(self.slots(part.block_table, part.cached, total))
            context = self.slots(part.block_table, 0, total)
            if part.new == 1:
                self._decode_rows.append(row)
                self._decode_contexts.append(context)
            else:
                self._prefills.append((row, part.new, part.cached, context))
            row += part.new
        self._write = writes[0] if len(writes) == 1 else torch.cat([_as_index(w, self.device) for w in writes])
        self._decode_mask = self._decode_lengths = None
        if len(self._decode_contexts) > 1:
            self._decode_lengths = lengths = torch.tensor([_length(c) for c in self._decode_contexts],
                                                          device=self.device)
            longest = int(lengths.max())
            index = torch.zeros(len(lengths), longest, dtype=torch.long, device=self.device)
            for i, context in enumerate(self._decode_contexts):
                index[i, : _length(context)] = _as_index(context, self.device)
            self._decode_contexts = [index]
            self._decode_mask = (torch.arange(longest, device=self.device)[None, :] < lengths[:, None])[:, None, None]

    def decode_slots(self) -> DecodeSlots | None:
        if self._prefills or not self._decode_rows:
            return None
        write = _as_index(self._write, self.device)
        if self._decode_lengths is None:  # one sequence
            context = _as_index(self._decode_contexts[0], self.device)
            return DecodeSlots(self.k, self.v, write, context[None], torch.tensor([len(context)], device=self.device))
        index = self._decode_contexts[0]
        assert isinstance(index, torch.Tensor)  # prepare() padded the contexts into one index
        return DecodeSlots(self.k, self.v, write, index, self._decode_lengths)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's ``k``/``v [T, kv_heads, D]`` and attend ``q [T, heads, D]``."""
        keys, values = self.k[layer], self.v[layer]  # [kv_heads, slots, D]
        _write(keys, self._write, k.transpose(0, 1))
        _write(values, self._write, v.transpose(0, 1))
        num_tokens, _, head_dim = q.shape
        kv_heads = k.shape[1]
        if self._decode_rows and len(self._decode_rows) == num_tokens and self._decode_mask is None:
            context = self._decode_contexts[0]  # one decoding sequence
            return attend_one(q, _read(keys, context), _read(values, context))
        out = torch.empty_like(q)
        if self._decode_rows:
            rows = self._decode_rows
            index = self._decode_contexts[0]
            if self._decode_mask is None:  # a single decoding sequence beside prompt chunks
                dk, dv = _read(keys, index), _read(values, index)
            else:  # index [B, L] -> [B, kv_heads, L, D]
                assert isinstance(index, torch.Tensor)  # prepare() padded the contexts into one index
                dk = _read(keys, index.flatten()).view(kv_heads, *index.shape, head_dim).transpose(0, 1)
                dv = _read(values, index.flatten()).view(kv_heads, *index.shape, head_dim).transpose(0, 1)
            out[rows] = attend_one(q[rows], dk, dv, self._decode_mask)
        for start, new, cached, context in self._prefills:
            pq = q[start : start + new].transpose(0, 1).unsqueeze(0)  # [1, H, new, D]
            pk, pv = _read(keys, context).unsqueeze(0), _read(values, context).unsqueeze(0)  # [1, kv_heads, L, D]
            mask = None
            if cached:  # causal over the new tokens, full over the cached prefix
                query_positions = torch.arange(cached, cached + new, device=q.device)[:, None]
                mask = torch.arange(cached + new, device=q.device)[None, :] <= query_positions
            attended = F.scaled_dot_product_attention(
                pq, pk, pv, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            out[start : start + new] = attended.squeeze(0).transpose(0, 1)
        return out


def _read(pool: torch.Tensor, context: Context) -> torch.Tensor:
    """``pool [kv_heads, slots, D]`` at ``context``: a view of a range, else a gather
    (``index_select``, several times faster than advanced indexing on CPU)."""
    return pool[:, context] if isinstance(context, slice) else pool.index_select(1, context)


def _write(pool: torch.Tensor, context: Context, values: torch.Tensor) -> None:
    if isinstance(context, slice):
        pool[:, context] = values
    else:
        pool.index_copy_(1, context, values)


def _length(context: Context) -> int:
    return context.stop - context.start if isinstance(context, slice) else len(context)


def _as_index(context: Context, device: torch.device) -> torch.Tensor:
    if isinstance(context, slice):
        return torch.arange(context.start, context.stop, device=device)
    return context
