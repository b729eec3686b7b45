"""benchmarks/gpu_check.py: its random checkpoints load on both sides, and its CPU dry run passes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenguard.runner.model.loader import load_checkpoint
from tokenguard.tokens import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    """The script imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_random_llama_folder_loads_and_every_id_decodes(gpu_check, tmp_path):
    config = gpu_check.SHAPES["tiny"]
    folder = tmp_path / "tiny"
    gpu_check.write_random_llama(folder, config, seed=0, device="cpu")

    llama_config, weights = load_checkpoint(folder)
    assert llama_config.vocab_size == config["vocab_size"]
    assert llama_config.rope_scaling is not None and llama_config.rope_scaling.kind == "llama3"
    assert "lm_head.weight" in weights  # the tiny shape is untied
    assert all(w.dtype == torch.bfloat16 for w in weights.values())

    tokenizer = get_tokenizer(str(folder))
    assert tokenizer.vocab_size <= llama_config.vocab_size
    assert tokenizer.eos_token_ids == frozenset()  # nothing ever stops a request early
    assert all(tokenizer.decode([i]) for i in range(llama_config.vocab_size))
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_dry_run_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    status = {row["check"]: row["status"] for row in json.loads(out.read_text())["rows"]}
    for check in ("exact fp32", "session reuse", "cancel stress", "bf16 close"):
        assert status.get(check) == "PASS", status
