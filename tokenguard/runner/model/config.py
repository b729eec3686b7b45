"""Llama-family hyper-parameters, read from GGUF metadata or a Hugging Face ``config.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tokenguard.runner.errors import UnsupportedModel


@dataclass(slots=True)
class RopeScaling:
    """How RoPE frequencies are rescaled for long context.

    ``kind`` is ``"linear"`` (positions divided by ``factor``), ``"llama3"`` (Llama 3.1's
    wavelength-dependent scaling) or ``"freq_factors"`` (per-frequency divisors stored in
    a GGUF's ``rope_freqs.weight``, llama.cpp's encoding of ``"llama3"``).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: torch.Tensor | None = None


@dataclass(slots=True)
class LlamaConfig:
    """Shape of a Llama-architecture decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )

    @property
    def num_parameters(self) -> int:
        """Parameters of the model this config describes (embeddings and the output
        head counted once when tied), whatever format stores them."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * self.intermediate_size + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Read a Hugging Face ``config.json`` dictionary of a ``llama`` model."""
        model_type = cfg.get("model_type")
        if model_type != "llama":
            archs = cfg.get("architectures") or []
            raise UnsupportedModel(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                "the runner executes Llama-architecture models (model_type 'llama')"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedModel(f"{source}: {flag}=true is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        heads = cfg["num_attention_heads"]
        # transformers 5 moved rope_theta/rope_scaling into rope_parameters.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=_hf_rope_scaling(rope, source),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def _hf_rope_scaling(rope: dict[str, Any], source: str) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    raise UnsupportedModel(
        f"{source}: rope scaling {kind!r} is not supported (supported: default, linear, llama3)"
    )


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32), scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "freq_factors":
        assert scaling.freq_factors is not None
        return inv_freq / scaling.freq_factors.float()
    # llama3, as in transformers' _compute_llama3_parameters
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
