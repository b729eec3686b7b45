"""Linear layers for each weight format, and the conversions that fill them.

Each layer's ``kernel()`` is its ``forward`` as a closure over its current tensors: the
decoder calls those (see :class:`~tokenguard.runner.model.llama.DecoderLayer`), since
decoding one token on a CPU is dispatch-bound and a closure skips the module's call and
attribute machinery.

* :class:`Linear` - a dense matrix in the compute dtype.
* :class:`Int8Linear` - int8 weights with one scale per output channel (weight-only).
* :class:`Int4Linear` - 4-bit weights in groups of 32 along the input dim, each group
  with a scale and an offset, executed by ``aten._weight_int4pack_mm_for_cpu``. GGUF
  Q4_0/Q4_1 blocks have exactly this form and are repacked bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from tokenguard.runner.model.weights import GGMLTensor, Weight, to_dense

GROUP_SIZE = 32  # GGUF's Q4_0/Q4_1 block size and the int4 kernel's group size

Kernel = Callable[[torch.Tensor], torch.Tensor]
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


class KernelModule(nn.Module):
    """A module whose ``forward`` is its :meth:`kernel` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel()(x)

    def kernel(self) -> Kernel:
        """``forward`` as a closure over the module's current tensors."""
        raise NotImplementedError


class Linear(KernelModule):
    """``x @ weight.T`` with a dense weight ``[out, in]`` (possibly a column-major view)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def kernel(self) -> Kernel:
        weight = self.weight
        return lambda x: F.linear(x, weight)


class HalfLinearCPU(Linear):
    """A float16 layer on CPU: matrix-vector products use the fast float16 kernel; a
    prompt chunk (more than one row) is multiplied in float32, since CPU float16 GEMM is
    about 10x slower than float32."""

    def kernel(self) -> Kernel:
        weight = self.weight

        def half_matmul(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 1:
                return F.linear(x, weight)
            return F.linear(x.float(), weight.float()).to(x.dtype)

        return half_matmul


# The weight-only kernels redo their dequantization for every row of ``x``: from this
# many rows on (a prompt chunk, a batch of decoding sequences) a dense GEMM over a
# dequantized copy is faster. Measured on 2 CPU cores, 3072x576: int4 0.06 ms at 1 row,
# 0.68 ms at 32; bfloat16 dense 0.15 ms and 0.35 ms; even at 8 rows.
DENSE_MIN_ROWS = 8


class Int8Linear(KernelModule):
    """Weight-only int8: ``weight [out, in]`` int8 and ``scales [out]`` in the compute dtype.

    Batches of at least :data:`DENSE_MIN_ROWS` rows use ``dense``, the same weights
    dequantized to the compute dtype.
    """

    weight: torch.Tensor  # buffers, registered in __init__
    scales: torch.Tensor
    dense: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        dense = weight.to(scales.dtype) * scales[:, None]
        self.register_buffer("dense", dense_matrix(dense, prefers_column_major(scales.dtype, weight.device)))

    def kernel(self) -> Kernel:
        weight, scales, dense = self.weight, self.scales, self.dense

        def int8_matmul(x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
            if x.shape[0] >= DENSE_MIN_ROWS:
                return F.linear(x, dense)
            return _INT8_MM(x, weight, scales)

        return int8_matmul


class Int4Linear(KernelModule):
    """Weight-only int4 in the CPU kernel's packed layout.

    ``scales_and_zeros [in/32, out, 2]`` (bfloat16) dequantize a 4-bit value ``q`` as
    ``(q - 8) * scale + zero``. The kernel takes bfloat16 activations. Batches of at
    least :data:`DENSE_MIN_ROWS` rows use ``dense``, the same weights dequantized to
    bfloat16 (memory for speed: the 4-bit kernel serves single-stream decoding).
    """

    packed: torch.Tensor  # buffers, registered in __init__
    scales_and_zeros: torch.Tensor
    dense: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                 dense: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("dense", dense)
        self.out_features = out_features

    def kernel(self) -> Kernel:
        packed, scales_and_zeros, dense = self.packed, self.scales_and_zeros, self.dense

        def int4_matmul(x: torch.Tensor) -> torch.Tensor:  # [T, in] bfloat16 -> [T, out]
            if x.shape[0] >= DENSE_MIN_ROWS:
                return F.linear(x, dense)
            return _INT4_MM(x, packed, GROUP_SIZE, scales_and_zeros)

        return int4_matmul


class ConcatLinear(KernelModule):
    """Row-stacked layers of different formats (a fused projection whose parts the file
    stores in different precisions), outputs concatenated."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def kernel(self) -> Kernel:
        kernels = [kernel_of(part) for part in self.parts]
        return lambda x: torch.cat([kernel(x) for kernel in kernels], dim=-1)


def kernel_of(module: nn.Module) -> Kernel:
    """``module``'s kernel (see the module docstring), or its ``forward`` if it has none."""
    return module.kernel() if isinstance(module, KernelModule) else module.forward


# GGML types wider than 4 bits: in int4 mode a quantized file's tensors of these types run
# as int8 rather than losing precision the file chose to keep.
WIDE_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_1,
    GGMLQuantizationType.Q8_K,
})


def int4_supported(out_features: int, in_features: int) -> bool:
    """Whether the CPU int4 kernel accepts a matrix of this shape."""
    return out_features % 16 == 0 and in_features % GROUP_SIZE == 0


def make_dense(weight: Weight, dtype: torch.dtype, device: torch.device) -> Linear:
    """A dense layer in the memory order and kernel that suit ``dtype`` on ``device``."""
    matrix = dense_matrix(to_dense(weight).to(dtype), prefers_column_major(dtype, device))
    if dtype == torch.float16 and device.type == "cpu":
        return HalfLinearCPU(matrix)
    return Linear(matrix)


def dense_matrix(weight: torch.Tensor, column_major: bool) -> torch.Tensor:
    """``weight [out, in]`` in row-major or column-major memory order."""
    return weight.t().contiguous().t() if column_major else weight.contiguous()


def prefers_column_major(dtype: torch.dtype, device: torch.device) -> bool:
    """On CPU, float32 matrix-vector products read an ``[in, out]``-contiguous matrix about
    twice as fast as an ``[out, in]`` one (the transposed GEMV uses both cores); bfloat16
    gains a little; float16 only has a fast kernel for ``[out, in]``."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def make_int8(weight: Weight, dtype: torch.dtype) -> Int8Linear:
    """Symmetric per-output-channel int8 of ``weight`` (dequantized first if it is GGML)."""
    w = to_dense(weight).float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Linear(q.contiguous(), scales.to(dtype))


def make_int4(parts: list[Weight]) -> Int4Linear:
    """One int4 layer of row-stacked ``parts``.

    GGUF Q4_0/Q4_1 blocks are repacked bit for bit; anything else is quantized to
    Q4_1-style groups (offset = group minimum, scale = range / 15).
    """
    groups = [_q4_groups(p) for p in parts]
    q = torch.cat([g[0] for g in groups])
    scales = torch.cat([g[1] for g in groups])
    zeros = torch.cat([g[2] for g in groups])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    # [out, groups] x2 -> [groups, out, 2]
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    # The dense copy from the same bfloat16 scales and zeros the kernel reads.
    scale, zero = (scales_and_zeros[..., i].t().repeat_interleave(GROUP_SIZE, dim=1).float() for i in (0, 1))
    dense = ((q - 8).float() * scale + zero).to(torch.bfloat16)
    return Int4Linear(packed, scales_and_zeros, q.shape[0], dense_matrix(dense, column_major=True))


def _q4_groups(weight: Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit values ``[out, in]`` int32 and per-group scale and zero ``[out, in/32]`` float32,
    such that the weight is ``(q - 8) * scale + zero``."""
    if isinstance(weight, GGMLTensor) and weight.qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        return _unpack_q4_blocks(weight)
    return _quantize_q4_groups(to_dense(weight).float())


def _unpack_q4_blocks(weight: GGMLTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 block (18 bytes): f16 d, 16 bytes of nibbles; value = d * (q - 8).
    Q4_1 block (20 bytes): f16 d, f16 m, 16 bytes of nibbles; value = d * q + m.
    Byte j holds element j in its low nibble and element j + 16 in its high nibble.
    """
    rows, cols = weight.shape
    groups = cols // GROUP_SIZE
    has_min = weight.qtype == GGMLQuantizationType.Q4_1
    header = 4 if has_min else 2
    blocks = torch.from_numpy(np.array(weight.data, dtype=np.uint8)).view(rows, groups, header + 16)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    nibbles = blocks[..., header:].to(torch.int32)
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(rows, cols)
    if has_min:
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        zeros = m + 8 * d  # d*q + m == (q - 8)*d + (m + 8d)
    else:
        zeros = torch.zeros_like(d)
    return q, d, zeros


def _quantize_q4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    g = w.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(rows, cols), scales, lo + 8 * scales
