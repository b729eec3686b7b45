"""What an engine process builds: the model file, its precision and device, and the
engine's settings, as plain values.

The recipe is pickled to the child, which builds the model from it: a closure or a model
object could not cross the process boundary, and the runner's own process never needs
the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenguard.runner.engine import Engine
from tokenguard.runner.model import PRECISIONS, LlamaModel, build_model, load_checkpoint


@dataclass(frozen=True)
class EngineRecipe:
    """A model file in a precision on a device, and the :class:`Engine` options."""

    model_path: Path
    precision: str  # a key of PRECISIONS
    device: str
    batch_window_ms: float = 50
    session_ttl_s: float = 600.0
    kv_cache_bytes: int | None = None
    cuda_graphs: bool = True
    #: torch's intra-op threads: the caller's setting (``torch.set_num_threads``) when
    #: the recipe is made, as when the engine ran in the caller's process.
    num_threads: int = field(default_factory=torch.get_num_threads)

    def build_model(self) -> LlamaModel:
        """Read the checkpoint and build the model (seconds; in the engine thread)."""
        config, weights = load_checkpoint(self.model_path)
        return build_model(config, weights, PRECISIONS[self.precision], torch.device(self.device))

    def start_engine(self, on_step: Callable[[], None] | None = None) -> Engine:
        """An :class:`Engine` serving this model; returns once the model is built. Sets
        torch's thread count for the whole process: call it in the engine process."""
        torch.set_num_threads(self.num_threads)
        return Engine(self.build_model, batch_window_ms=self.batch_window_ms, session_ttl_s=self.session_ttl_s,
                      kv_cache_bytes=self.kv_cache_bytes, cuda_graphs=self.cuda_graphs, on_step=on_step)
