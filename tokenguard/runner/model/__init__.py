"""The Llama model: checkpoint loaders (GGUF, safetensors), weight formats and
precision modes, and the PyTorch decoder with its contiguous KV cache.

:func:`load_checkpoint` reads a file into a :class:`LlamaConfig` and weights;
:func:`build_model` assembles a :class:`LlamaModel` from them in a :class:`Precision`.
This layer knows nothing of the serving engine (:mod:`tokenguard.runner.engine`).
"""

from tokenguard.runner.model.build import build_model
from tokenguard.runner.model.config import LlamaConfig, RopeScaling
from tokenguard.runner.model.kv_cache import ContiguousKVCache, KVCache
from tokenguard.runner.model.llama import LlamaModel
from tokenguard.runner.model.loader import (
    checkpoint_bytes,
    checkpoint_format,
    is_default_model,
    load_checkpoint,
    resolve_model_path,
)
from tokenguard.runner.model.precision import PRECISIONS, Precision, resolve_device, resolve_precision
from tokenguard.runner.model.weights import GGMLTensor, Weight

__all__ = [
    "PRECISIONS",
    "ContiguousKVCache",
    "GGMLTensor",
    "KVCache",
    "LlamaConfig",
    "LlamaModel",
    "Precision",
    "RopeScaling",
    "Weight",
    "build_model",
    "checkpoint_bytes",
    "checkpoint_format",
    "is_default_model",
    "load_checkpoint",
    "resolve_device",
    "resolve_model_path",
    "resolve_precision",
]
