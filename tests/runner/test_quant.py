"""Weight formats: GGUF Q4_0/Q4_1 blocks repacked for the int4 kernel give the same
matrix the file encodes; int8 is close to its float source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tokenguard.runner.model.quant import ConcatLinear, Int4Linear, make_int4, make_int8
from tokenguard.runner.model.weights import GGMLTensor


def ggml(qtype: GGMLQuantizationType, rows: int = 48, cols: int = 96, seed: int = 0) -> GGMLTensor:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return GGMLTensor(qtype, (rows, cols), quants.quantize(w, qtype))


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_int4_repack_is_the_files_matrix(qtype):
    weight = ggml(qtype)
    layer = make_int4([weight])
    x = torch.randn(5, weight.shape[1]).to(torch.bfloat16)
    # The kernel's scales are bfloat16: compare against the file's matrix with the same rounding.
    exact = weight.dequantize()
    got = layer(x).float()
    want = x.float() @ exact.T
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_int4_mixed_q4_types_fuse_into_one_kernel():
    parts = [ggml(GGMLQuantizationType.Q4_0, 32, 64, 1), ggml(GGMLQuantizationType.Q4_1, 16, 64, 2)]
    layer = make_int4(parts)
    assert isinstance(layer, Int4Linear) and layer.out_features == 48
    x = torch.randn(3, 64).to(torch.bfloat16)
    want = x.float() @ torch.cat([p.dequantize() for p in parts]).T
    assert (layer(x).float() - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_int8_per_channel_close_to_source():
    w = torch.randn(64, 96)
    layer = make_int8(w, torch.bfloat16)
    x = torch.randn(4, 96).to(torch.bfloat16)
    want = x.float() @ w.T
    assert (layer(x).float() - want).abs().max().item() < 0.03 * want.abs().max().item()


def test_concat_linear_stacks_outputs():
    a, b = torch.randn(16, 32), torch.randn(8, 32)
    layer = ConcatLinear([make_int8(a, torch.bfloat16), make_int8(b, torch.bfloat16)])
    x = torch.randn(2, 32).to(torch.bfloat16)
    assert layer(x).shape == (2, 24)


def test_batches_use_the_same_weights_dequantized():
    # Few rows run the weight-only kernels; DENSE_MIN_ROWS rows and more a dense GEMM over
    # the same dequantized weights. Both must compute the same product.
    from tokenguard.runner.model.quant import DENSE_MIN_ROWS

    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    int4, int8 = make_int4([weight]), make_int8(weight, torch.bfloat16)
    x = torch.randn(DENSE_MIN_ROWS, 96, dtype=torch.bfloat16)
    for layer in (int4, int8):
        one_by_one = torch.cat([layer(row[None]) for row in x]).float()
        batched = layer(x).float()
        assert torch.allclose(batched, one_by_one, rtol=2e-2, atol=2e-2 * one_by_one.abs().max().item())
