"""Read a Hugging Face checkpoint folder: ``config.json`` plus ``*.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from tokenguard.runner.errors import UnsupportedModel
from tokenguard.runner.model.config import LlamaConfig
from tokenguard.runner.model.weights import Weight


def load_hf_folder(folder: str | Path) -> tuple[LlamaConfig, dict[str, Weight]]:
    """Config and weights (torch tensors in their stored dtype) of a checkpoint folder."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UnsupportedModel(f"{folder}: no config.json; expected a Hugging Face checkpoint folder")
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise UnsupportedModel(f"{config_file}: quantized checkpoints ({method}) are not supported")
    config = LlamaConfig.from_hf(cfg, source=str(config_file))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    weights: dict[str, Weight] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                weights[name] = f.get_tensor(name)
    return config, weights
