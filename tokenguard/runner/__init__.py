"""The bundled Llama runner: GGUF and safetensors loaders, a PyTorch Llama model,
sampling and streaming.

>>> from tokenguard.runner import LlamaRunner
>>> LlamaRunner().chat([{"role": "user", "content": "Say hello"}]).text  # doctest: +SKIP
"""

from tokenguard.runner.engine import KVCacheTooSmall
from tokenguard.runner.errors import EngineDied, ModelNotFound, UnsupportedModel
from tokenguard.runner.llama_runner import AsyncTextStream, LlamaRunner, TextStream
from tokenguard.runner.result import GenerationResult
from tokenguard.runner.sampling import SamplingParams

__all__ = [
    "AsyncTextStream",
    "EngineDied",
    "GenerationResult",
    "KVCacheTooSmall",
    "LlamaRunner",
    "ModelNotFound",
    "SamplingParams",
    "TextStream",
    "UnsupportedModel",
]
