"""Keys and values of many sequences in one pre-allocated pool of blocks.

The pool is ``[layers, num_blocks * block_size, kv_heads, head_dim]``: a token's slot
is ``block * block_size + offset``. Before each forward the scheduler describes the
flat batch with :meth:`PagedKVCache.prepare` - for every sequence, in batch order,
its block table, how many tokens are already cached and how many are new - and each
layer's :meth:`attend` writes the new keys and values into their slots, gathers every
sequence's context and runs ``scaled_dot_product_attention`` over it. Decoding
sequences are attended together as one padded batch; prompt chunks one by one with
a causal mask offset by their cached prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's part of a forward: its blocks, cached tokens and new tokens."""

    block_table: Sequence[int]
    cached: int  # tokens already in the cache before this step
    new: int  # tokens this step adds (1 when decoding)


class PagedKVCache:
    """The KV pool, and the layout of the current forward's flat batch."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.device = torch.device(device)
        self._write_slots = torch.empty(0, dtype=torch.long)
        self._prefills: list[tuple[int, int, int, torch.Tensor]] = []  # (token start, new, cached, slots)
        self._decode_rows = torch.empty(0, dtype=torch.long)
        self._decode_slots = torch.empty(0, 0, dtype=torch.long)
        self._decode_mask = torch.empty(0, 0, dtype=torch.bool)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Pool bytes one cached token takes (keys and values, every layer)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def slots(self, block_table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of token positions ``start..end`` of a sequence with ``block_table``."""
        positions = torch.arange(start, end)
        blocks = torch.as_tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def prepare(self, batch: Sequence[SequenceSlice]) -> None:
        """Describe the next forward: ``batch`` in the order its tokens are laid out."""
        write, decode_rows, decode_slots, self._prefills = [], [], [], []
        row = 0
        for part in batch:
            context = self.slots(part.block_table, 0, part.cached + part.new)
            write.append(context[part.cached :])
            if part.new == 1:
                decode_rows.append(row)
                decode_slots.append(context)
            else:
                self._prefills.append((row, part.new, part.cached, context))
            row += part.new
        self._write_slots = torch.cat(write) if write else torch.empty(0, dtype=torch.long, device=self.device)
        self._decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=self.device)
        if decode_slots:
            longest = max(len(s) for s in decode_slots)
            self._decode_slots = torch.zeros(len(decode_slots), longest, dtype=torch.long, device=self.device)
            self._decode_mask = torch.zeros(len(decode_slots), longest, dtype=torch.bool, device=self.device)
            for i, s in enumerate(decode_slots):
                self._decode_slots[i, : len(s)] = s
                self._decode_mask[i, : len(s)] = True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's ``k``/``v [T, kv_heads, D]`` and attend ``q [T, heads, D]``."""
        keys, values = self.k[layer], self.v[layer]
        keys[self._write_slots] = k
        values[self._write_slots] = v
        out = torch.empty_like(q)
        num_heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        if len(self._decode_rows):
            batch = len(self._decode_rows)
            # [B, kv_heads, group, D]: query heads sharing a KV head sit in its "sequence" dim.
            dq = q[self._decode_rows].view(batch, kv_heads, num_heads // kv_heads, head_dim)
            dk = keys[self._decode_slots].transpose(1, 2)  # [B, kv_heads, L, D]
            dv = values[self._decode_slots].transpose(1, 2)
            mask = self._decode_mask[:, None, None, :]  # [B, 1, 1, L]
            attended = F.scaled_dot_product_attention(dq, dk, dv, attn_mask=mask)
            out[self._decode_rows] = attended.reshape(batch, num_heads, head_dim)
        for start, new, cached, context in self._prefills:
            pq = q[start : start + new].transpose(0, 1).unsqueeze(0)  # [1, H, new, D]
            pk = keys[context].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, L, D]
            pv = values[context].transpose(0, 1).unsqueeze(0)
            mask = None
            if cached:  # causal over the new tokens, full over the cached prefix
                rows = torch.arange(cached, cached + new, device=q.device)[:, None]
                mask = torch.arange(cached + new, device=q.device)[None, :] <= rows
            attended = F.scaled_dot_product_attention(
                pq, pk, pv, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            out[start : start + new] = attended.squeeze(0).transpose(0, 1)
        return out
