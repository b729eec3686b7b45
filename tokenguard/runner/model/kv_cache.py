"""Key/value caches. The model hands each layer's new keys and values to the cache and
gets the attention output back, so the engine's paged cache
(:mod:`tokenguard.runner.engine.paged_cache`) can replace this one without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class DecodeSlots:
    """Where a decode-only step reads and writes the KV cache.

    ``keys``/``values`` are the pools ``[layers, kv_heads, slots, head_dim]``; row ``b``
    writes its new key and value at slot ``write[b]`` and attends over the slots
    ``context[b, :lengths[b]]`` (which include ``write[b]``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    write: torch.Tensor  # [B] int64
    context: torch.Tensor  # [B, L] int64, rows padded past their length
    lengths: torch.Tensor  # [B] int64


class KVCache(Protocol):
    """What the model's attention needs from a cache."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k``/``v`` of this step's tokens and attend ``q`` over the cached sequence.

        ``q``: ``[T, num_heads, head_dim]``; ``k``, ``v``: ``[T, num_kv_heads, head_dim]``
        (RoPE applied). Returns ``[T, num_heads, head_dim]``.
        """
        ...

    def decode_slots(self) -> DecodeSlots | None:
        """The slots of the coming step if each of its tokens decodes one token of its own
        sequence (the native decode step takes those, see :mod:`.native`); else None."""
        ...


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None,
               ) -> torch.Tensor:
    """Attention of decoding queries ``q [B, heads, D]`` over ``keys``/``values``
    ``[B, kv_heads, L, D]`` (or ``[kv_heads, L, D]`` for one sequence); ``mask`` a boolean
    ``[B, 1, 1, L]`` of the positions to attend. Returns ``[B, heads, D]``.

    Grouped-query attention copies no K/V either way. On a CPU the kernel's own
    (``enable_gqa``) is 8-27% faster (one work item per query head); elsewhere the query
    heads that share a KV head are folded into its "sequence" dim, which every fused
    kernel takes. (4-D inputs take the fused CPU kernel; 3-D ones a slower composite.)
    """
    if keys.dim() == 3:
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
    batch, num_heads, head_dim = q.shape
    if q.device.type == "cpu":
        out = F.scaled_dot_product_attention(q.view(batch, num_heads, 1, head_dim), keys, values, attn_mask=mask,
                                             enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q.view(batch, keys.shape[1], -1, head_dim), keys, values,
                                             attn_mask=mask)
    return out.reshape(batch, num_heads, head_dim)


class ContiguousKVCache:
    """One sequence's keys and values in preallocated ``[layers, kv_heads, capacity, head_dim]``.

    Before each forward the caller says where this step's tokens go with
    :meth:`begin` (``start`` = number of tokens already cached).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens cached after the current step
        self._start = 0
        self._positions = torch.arange(capacity, device=device)

    def begin(self, start: int, num_tokens: int) -> None:
        """Place the next forward's ``num_tokens`` tokens at positions ``start...``."""
        end = start + num_tokens
        if start > self.length or end > self.capacity:
            raise ValueError(f"tokens {start}..{end} do not fit a cache of {self.length}/{self.capacity}")
        self._start, self.length = start, end

    def decode_slots(self) -> DecodeSlots | None:
        start, end = self._start, self.length
        if end - start != 1:
            return None
        return DecodeSlots(self.k, self.v, self._positions[start:end], self._positions[None, :end],
                           torch.tensor([end], device=self.k.device))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self._start, self.length
        num_tokens = q.shape[0]
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        keys = self.k[layer, :, :end]  # [kv_heads, end, head_dim]
        values = self.v[layer, :, :end]
        if num_tokens == 1:
            return attend_one(q, keys, values)
        mask = None
        if start > 0:  # causal over the new tokens, full over the cached prefix
            rows = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=mask is None, enable_gqa=True,
        )  # [1, num_heads, T, head_dim]
        return out.squeeze(0).transpose(0, 1)
