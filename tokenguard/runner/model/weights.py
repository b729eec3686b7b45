"""Checkpoint tensors as loaders hand them over: dense torch tensors or raw GGML blocks.

Loaders name every tensor the Hugging Face way (``model.layers.0.self_attn.q_proj.weight``)
so the model builder has one vocabulary whatever the file format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants


@dataclass(slots=True)
class GGMLTensor:
    """A 2-D GGUF tensor left in its file encoding (rows of ggml blocks along the input dim).

    Kept raw so a precision mode can execute the blocks as they are (``int4`` repacks
    Q4_0/Q4_1 blocks for torch's int4 kernel) instead of dequantizing and requantizing.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # (rows, cols) = (out_features, in_features)
    data: np.ndarray  # uint8 [rows, bytes_per_row]

    def dequantize(self) -> torch.Tensor:
        """The tensor as float32 ``[rows, cols]``."""
        values = quants.dequantize(self.data, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape))

    def take_rows(self, index: np.ndarray) -> GGMLTensor:
        """The same tensor with its rows reordered (blocks never straddle rows)."""
        return GGMLTensor(self.qtype, self.shape, np.ascontiguousarray(self.data[index]))


Weight = torch.Tensor | GGMLTensor


def to_dense(weight: Weight) -> torch.Tensor:
    """A floating-point torch tensor of ``weight`` in its own precision (float32 for GGML blocks)."""
    return weight.dequantize() if isinstance(weight, GGMLTensor) else weight
