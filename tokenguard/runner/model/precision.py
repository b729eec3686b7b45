"""Precision modes: how weights are stored and which dtype activations use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenguard.errors import ConfigError


@dataclass(slots=True, frozen=True)
class Precision:
    """A precision mode.

    ``name`` is what users pass as ``dtype``; ``dtype`` is the activation dtype;
    ``weights`` is ``"dense"`` (weights in ``dtype``), ``"int8"`` or ``"int4"``.
    """

    name: str
    dtype: torch.dtype
    weights: str


PRECISIONS: dict[str, Precision] = {
    "float32": Precision("float32", torch.float32, "dense"),
    "bfloat16": Precision("bfloat16", torch.bfloat16, "dense"),
    "float16": Precision("float16", torch.float16, "dense"),
    # Weight-only quantized modes run bfloat16 activations: the CPU kernels want them.
    "int8": Precision("int8", torch.bfloat16, "int8"),
    "int4": Precision("int4", torch.bfloat16, "int4"),
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "q4": "int4"}

# dtype="auto": the fastest mode measured by benchmarks/bench_runner.py on each device.
AUTO_CPU = "int4"
AUTO_CUDA = "bfloat16"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, otherwise CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"the runner runs on 'cpu' or 'cuda', not {resolved.type!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA GPU here; use device='cpu' or 'auto'")
    return resolved


def resolve_precision(dtype: str | torch.dtype, device: torch.device) -> Precision:
    """The :class:`Precision` for a ``dtype`` argument (a mode name or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(dtype, dtype)
    if name == "auto":
        name = AUTO_CUDA if device.type == "cuda" else AUTO_CPU
    if name not in PRECISIONS:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(PRECISIONS)}, got {dtype!r}")
    precision = PRECISIONS[name]
    if precision.weights != "dense" and device.type != "cpu":
        raise ConfigError(f"dtype={name!r} runs on CPU only; on {device.type} use 'bfloat16' or 'float16'")
    return precision
