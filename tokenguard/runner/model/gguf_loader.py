"""Read a Llama-architecture GGUF file: hyper-parameters from its metadata, tensors by HF name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from tokenguard.runner.errors import UnsupportedModel
from tokenguard.runner.model.config import LlamaConfig, RopeScaling
from tokenguard.runner.model.weights import GGMLTensor, Weight

SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
}


def load_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, Weight]]:
    """Config and weights of the GGUF at ``path``.

    Quantized matrices stay as :class:`GGMLTensor` blocks; float tensors become torch
    tensors in the file's precision. ``attn_q``/``attn_k`` rows are put back in the
    Hugging Face order (llama.cpp permutes them for its interleaved RoPE).
    """
    path = Path(path)
    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{path.name}: architecture {arch!r} is not supported; the runner executes "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, arch, tensors, reader, path.name)
    weights: dict[str, Weight] = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        if hf_name is None:
            if name == "rope_freqs.weight":
                continue
            raise UnsupportedModel(f"{path.name}: unexpected tensor {name!r} for a llama model")
        weight = _read_tensor(tensor, path.name)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in name else config.num_kv_heads
            weight = _unpermute_rows(weight, heads)
        weights[hf_name] = weight
    return config, weights


def _config(meta: dict[str, Any], arch: str, tensors: dict[str, Any], reader: GGUFReader,
            source: str) -> LlamaConfig:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            raise UnsupportedModel(f"{source}: per-layer {arch}.{key} is not supported")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModel(f"{source}: key and value head sizes differ")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModel(f"{source}: partial rotary embeddings are not supported")
    embed = tensors["token_embd.weight"]
    vocab = int(get("vocab_size", embed.shape[-1]))
    scaling: RopeScaling | None = None
    kind = get("rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
        scaling = RopeScaling("freq_factors", freq_factors=torch.from_numpy(factors.copy()))
    elif kind == "linear":
        scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
    elif kind not in ("none", None):
        raise UnsupportedModel(f"{source}: rope scaling {kind!r} is not supported")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
    )


def _hf_name(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight",):
        return None
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    return None


def _read_tensor(tensor: Any, source: str) -> Weight:
    qtype = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the fastest dim first
    if qtype in _FLOAT_TYPES:
        array = np.array(tensor.data, dtype=_FLOAT_TYPES[qtype]).reshape(shape)
        return torch.from_numpy(array)
    if qtype == GGMLQuantizationType.BF16:
        return torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    if len(shape) != 2:
        raise UnsupportedModel(f"{source}: quantized {len(shape)}-D tensor {tensor.name!r} is not supported")
    data = np.asarray(tensor.data).reshape(shape[0], -1)
    try:
        quants.dequantize(data[:1], qtype)
    except NotImplementedError:
        raise UnsupportedModel(
            f"{source}: tensor {tensor.name!r} uses quantization type {qtype.name}, which the "
            "installed gguf package cannot dequantize"
        ) from None
    return GGMLTensor(qtype, (shape[0], shape[1]), data)


def _unpermute_rows(weight: Weight, heads: int) -> Weight:
    """Undo llama.cpp's ``permute``: per head, rows (half, 2) back to (2, half)."""
    rows = weight.shape[0]
    # index[h, i, k] = h*head_dim + 2k + i: HF row (h, i, k) is file row (h, k, i)
    index = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(weight, GGMLTensor):
        return weight.take_rows(index)
    return weight[torch.from_numpy(index)].contiguous()
