"""Assemble a :class:`LlamaModel` from checkpoint weights in a precision mode."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from tokenguard.runner.errors import UnsupportedModel
from tokenguard.runner.model.config import LlamaConfig
from tokenguard.runner.model.llama import DecoderLayer, LlamaModel, RMSNorm
from tokenguard.runner.model.precision import Precision
from tokenguard.runner.model.quant import (
    WIDE_TYPES,
    ConcatLinear,
    int4_supported,
    make_dense,
    make_int4,
    make_int8,
)
from tokenguard.runner.model.weights import GGMLTensor, Weight, to_dense

logger = logging.getLogger(__name__)


def build_model(config: LlamaConfig, weights: dict[str, Weight], precision: Precision,
                device: torch.device | str = "cpu", *, native: bool = True) -> LlamaModel:
    """The model of ``weights`` (HF names) with linear layers in ``precision``'s format.

    ``native``: decode-only steps on CPU run the native decode step (see
    :mod:`~tokenguard.runner.model.native`; compiled on first use, PyTorch where it cannot be).

    Converting a large float checkpoint to int4 or int8 takes a while: progress is
    logged at DEBUG every quarter of the layers.
    """
    start = time.perf_counter()
    weights = dict(weights)

    def take(name: str) -> Weight:
        try:
            return weights.pop(name)
        except KeyError:
            raise UnsupportedModel(f"checkpoint has no tensor {name!r}") from None

    # int4 keeps a quantized file's choices: what it stores in 4 bits or fewer runs as int4,
    # wider tensors as int8. A float checkpoint is quantized to int4 throughout.
    quantized_file = any(isinstance(w, GGMLTensor) for w in weights.values())

    device = torch.device(device)

    def linear(parts: list[Weight]) -> nn.Module:
        if precision.weights == "dense":
            return make_dense(_concat_rows(parts), precision.dtype, device)
        if precision.weights == "int8":
            return make_int8(_concat_rows(parts), precision.dtype)
        runs: list[tuple[bool, list[Weight]]] = []  # consecutive parts of the same format
        for part in parts:
            as_int4 = not (quantized_file and _is_wide(part))
            if runs and runs[-1][0] == as_int4:
                runs[-1][1].append(part)
            else:
                runs.append((as_int4, [part]))
        modules = [
            make_int4(run) if as_int4 and int4_supported(sum(p.shape[0] for p in run), run[0].shape[1])
            else make_int8(_concat_rows(run), precision.dtype)
            for as_int4, run in runs
        ]
        return modules[0] if len(modules) == 1 else ConcatLinear(modules)

    def norm(name: str) -> RMSNorm:
        return RMSNorm(to_dense(take(name)).float(), config.rms_norm_eps, out_dtype=precision.dtype)

    embed_weight = take("model.embed_tokens.weight")
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layers.append(DecoderLayer(
            config, i,
            wqkv=linear([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            wo=linear([take(p + "self_attn.o_proj.weight")]),
            w13=linear([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
            w2=linear([take(p + "mlp.down_proj.weight")]),
            attention_norm=norm(p + "input_layernorm.weight"),
            ffn_norm=norm(p + "post_attention_layernorm.weight"),
        ))
        _log_progress(i + 1, config.num_layers, precision, start)
    head_weight = weights.pop("lm_head.weight", None)
    if head_weight is None and not config.tie_word_embeddings:
        raise UnsupportedModel("checkpoint has no lm_head.weight and does not tie embeddings")
    lm_head: nn.Module
    if precision.weights == "dense" and head_weight is None:
        # tied: the lookup table is the lm_head's matrix, kept in the lm_head's memory order
        lm_head = make_dense(embed_weight, precision.dtype, device)
        embed = lm_head.weight.data
    else:
        embed = to_dense(embed_weight).to(precision.dtype).contiguous()
        if head_weight is not None and precision.weights == "dense":
            lm_head = make_dense(head_weight, precision.dtype, device)
        else:
            # The output projection is the largest matrix and the most sensitive to rounding:
            # quantized modes keep it at int8 (llama.cpp keeps it at Q8_0 or better).
            lm_head = make_int8(embed_weight if head_weight is None else head_weight, precision.dtype)
    model = LlamaModel(
        config,
        embed_tokens=embed,
        layers=layers,
        norm=norm("model.norm.weight"),
        lm_head=lm_head,
        dtype=precision.dtype,
    )
    if weights:
        raise UnsupportedModel(f"checkpoint has tensors the Llama model does not use: {sorted(weights)[:5]}")
    model = model.to(device).eval()
    model.use_native_decode(native)
    logger.debug("built the model (%s on %s) in %.1f s", precision.name, device, time.perf_counter() - start)
    return model


def _log_progress(done: int, total: int, precision: Precision, start: float) -> None:
    """Log at DEBUG after every quarter of the layers (and the last one)."""
    step = max(1, -(-total // 4))
    if done % step == 0 or done == total:
        logger.debug("converted layer %d/%d to %s (%.1f s)", done, total, precision.name,
                     time.perf_counter() - start)


def _concat_rows(parts: list[Weight]) -> Weight:
    """Stack matrices along the output dim; GGML blocks stay blocks when their types agree."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, GGMLTensor) and all(
        isinstance(p, GGMLTensor) and p.qtype == first.qtype for p in parts
    ):
        rows = sum(p.shape[0] for p in parts)
        data = np.concatenate([p.data for p in parts], axis=0)
        return GGMLTensor(first.qtype, (rows, first.shape[1]), data)
    dense = [to_dense(p) for p in parts]
    dtype = dense[0].dtype if all(d.dtype == dense[0].dtype for d in dense) else torch.float32
    return torch.cat([d.to(dtype) for d in dense], dim=0)


def _is_wide(weight: Weight) -> bool:
    return not isinstance(weight, GGMLTensor) or weight.qtype in WIDE_TYPES
