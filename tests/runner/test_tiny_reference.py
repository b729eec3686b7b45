"""A tiny random-weight Llama (GQA, untied embeddings, llama3 rope scaling), read from a
GGUF file and from a safetensors folder, against transformers' LlamaForCausalLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenguard.runner.generate import decode_one_token, prefill
from tokenguard.runner.model.build import build_model
from tokenguard.runner.model.kv_cache import ContiguousKVCache
from tokenguard.runner.model.loader import load_checkpoint
from tokenguard.runner.model.precision import PRECISIONS

pytestmark = pytest.mark.slow  # imports transformers

PROMPT = [5, 77, 200, 13, 13, 99, 256, 42, 7, 150, 3]
CONTINUATION = [17, 250, 1, 64, 128, 9, 33, 200]


def runner_logits(path: Path, mode: str = "float32", chunk_size: int = 512) -> torch.Tensor:
    """Logits ``[len(CONTINUATION) + 1, vocab]``: after the prompt, then after each continuation token."""
    config, weights = load_checkpoint(path)
    model = build_model(config, weights, PRECISIONS[mode])
    cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim, 64, model.dtype)
    rows = [prefill(model, torch.tensor(PROMPT), cache, chunk_size=chunk_size)]
    for i, token in enumerate(CONTINUATION):
        rows.append(decode_one_token(model, torch.tensor([token]), len(PROMPT) + i, cache))
    return torch.stack(rows)


def reference_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + CONTINUATION])).logits[0]
    return logits[len(PROMPT) - 1 :].float()


@pytest.mark.parametrize("source", ["folder", "gguf_path"])
def test_float_checkpoint_matches_transformers(tiny_llama, tiny_reference, source):
    ours = runner_logits(getattr(tiny_llama, source))
    ref = reference_logits(tiny_reference[0])
    assert ref.std() > 0.5  # far from uniform: the comparison means something
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_quantized_gguf_matches_transformers_on_dequantized_weights(tiny_llama, tiny_reference):
    ours = runner_logits(tiny_llama.gguf_q_path)
    ref = reference_logits(tiny_reference[1])
    assert (ours - ref).abs().max().item() < 1e-4


def test_chunked_prefill_matches(tiny_llama, tiny_reference):
    ours = runner_logits(tiny_llama.folder, chunk_size=3)  # later chunks attend over a cached prefix
    ref = reference_logits(tiny_reference[0])
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["bfloat16", "float16", "int8", "int4"])
def test_reduced_precision_stays_close(tiny_llama, tiny_reference, mode):
    ours = runner_logits(tiny_llama.gguf_q_path, mode)
    ref = reference_logits(tiny_reference[1])
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() < 0.05 * scale
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75
