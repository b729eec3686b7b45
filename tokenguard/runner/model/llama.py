"""The Llama decoder over a flat batch of tokens.

``forward(input_ids [T], positions [T], kv_cache)`` takes the tokens of one step -
a prompt chunk or one decoded token - and leaves sequence bookkeeping to the cache, so
the same model serves a contiguous per-sequence cache (``kv_cache.py``) and a paged one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenguard.runner.model.config import LlamaConfig, rope_inv_freq
from tokenguard.runner.model.kv_cache import KVCache
from tokenguard.runner.model.native import NativeDecode, native_decode_for
from tokenguard.runner.model.quant import Kernel, KernelModule, kernel_of


class RMSNorm(KernelModule):
    """RMS normalization computed in the residual stream's dtype, output in ``out_dtype``
    (the dtype the following matmul takes)."""

    def __init__(self, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.out_dtype = out_dtype

    def kernel(self) -> Kernel:
        weight, shape, eps, out_dtype = self.weight, tuple(self.weight.shape), self.eps, self.out_dtype
        return lambda x: F.rms_norm(x, shape, weight, eps).to(out_dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` (HF half-split layout): ``x * cos + rotate_half(x) * sin``.

    ``rotate_half(x) = cat(-x2, x1)`` is ``roll(x, D/2)`` with the sign moved into
    ``signed_sin = cat(-sin1, sin2)`` (``[T, 1, head_dim]``): three kernels instead of five.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class DecoderLayer(nn.Module):
    """One layer: attention over the KV cache, then the gated feed-forward, each with a
    pre-norm and a residual.

    The step calls its norms' and matmuls' kernels (closures over their tensors, see
    :mod:`tokenguard.runner.model.quant`) rather than ``nn.Module.__call__``: decoding
    one token on a CPU is dispatch-bound, the hook and attribute machinery of the nested
    module calls cost about a seventh of the step, and these modules never carry hooks.
    They are bound again whenever its tensors move (``.to()``) and when it is copied.
    """

    def __init__(self, config: LlamaConfig, layer: int, *, wqkv: nn.Module, wo: nn.Module, w13: nn.Module,
                 w2: nn.Module, attention_norm: RMSNorm, ffn_norm: RMSNorm) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.wqkv = wqkv  # fused q, k, v projections
        self.wo = wo
        self.w13 = w13  # fused gate and up projections
        self.w2 = w2
        self.attention_norm = attention_norm
        self.ffn_norm = ffn_norm
        self.bind_kernels()

    def bind_kernels(self) -> None:
        """Take the kernels of the layer's current tensors."""
        self._kernels = tuple(kernel_of(m) for m in (self.attention_norm, self.wqkv, self.wo, self.ffn_norm,
                                                      self.w13, self.w2))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DecoderLayer:
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ... of the layer or the
        model), then the kernels of the moved tensors."""
        super()._apply(fn, recurse)
        self.bind_kernels()
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and deep-copied without its kernels (closures), bound again on arrival."""
        state = self.__dict__.copy()
        del state["_kernels"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.bind_kernels()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        attention_norm, wqkv, wo, ffn_norm, w13, w2 = self._kernels
        num_tokens, head_dim = x.shape[0], self.head_dim
        qkv = wqkv(attention_norm(x))  # [T, (H + 2 * Hkv) * D]
        qk_heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : qk_heads * head_dim].view(num_tokens, qk_heads, head_dim)
        v = qkv[:, qk_heads * head_dim :].view(num_tokens, self.num_kv_heads, head_dim)
        qk = apply_rope(qk, cos, sin)  # one rotation for q and k together
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        attended = kv_cache.attend(self.layer, q, k, v)  # [T, H, D]
        h = x + wo(attended.reshape(num_tokens, self.num_heads * head_dim))
        gate, up = w13(ffn_norm(h)).chunk(2, dim=-1)
        return h + w2(F.silu(gate) * up)


class LlamaModel(nn.Module):
    """A Llama decoder whose layers are already built (see :mod:`tokenguard.runner.model.build`).

    Matmuls, attention and the KV cache run in ``dtype``; the residual stream and the
    norms stay in float32, which keeps reduced-precision modes close to float32 at no
    measurable cost.
    """

    residual_dtype = torch.float32
    inv_freq: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, config: LlamaConfig, embed_tokens: torch.Tensor, layers: list[DecoderLayer],
                 norm: RMSNorm, lm_head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype  # matmul / attention / KV cache dtype
        self.embed_tokens = nn.Parameter(embed_tokens, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._layer_steps = tuple(layer.forward for layer in layers)  # see DecoderLayer
        self._wants_native = False
        self._native: NativeDecode | None = None

    @property
    def native_decode(self) -> bool:
        """Whether decode-only steps run the native decode step (see :mod:`.native`)."""
        return self._native is not None

    def use_native_decode(self, enabled: bool = True) -> bool:
        """Run decode-only steps through the native decode step where it applies (on
        CPU, where it can be built); return whether it now does."""
        self._wants_native = enabled
        self._native = native_decode_for(self) if enabled else None
        return self._native is not None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LlamaModel:
        """``nn.Module._apply`` (``.to()``, ...), then the native step of the moved tensors."""
        super()._apply(fn, recurse)
        if self._wants_native:
            self.use_native_decode()
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and deep-copied without the native step, bound again on arrival."""
        state = self.__dict__.copy()
        state["_native"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.use_native_decode(state.get("_wants_native", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` (normed, in ``dtype``) of the tokens
        ``input_ids [T]`` at ``positions [T]``."""
        x = F.embedding(input_ids, self.embed_tokens).to(self.residual_dtype)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2], float32 like HF
        cos = freqs.cos().repeat(1, 2)  # [T, D]
        sin = freqs.sin()
        sin = torch.cat([-sin, sin], dim=-1)  # signed, see apply_rope
        native = self._native
        describe = getattr(kv_cache, "decode_slots", None) if native is not None else None
        slots = describe() if describe is not None else None  # (a cache of one's own may not describe steps)
        if native is not None and slots is not None:
            return self.norm(native(x, cos, sin, slots))
        cos, sin = cos[:, None, :].to(self.dtype), sin[:, None, :].to(self.dtype)  # [T, 1, D]
        for layer_step in self._layer_steps:
            x = layer_step(x, cos, sin, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` of final hidden states ``[N, hidden]`` (from :meth:`forward`)."""
        return self.lm_head(hidden).float()
