"""The plain single-sequence loop (prefill + decode_one_token over a contiguous cache)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from tokenguard.runner.generate import generate_tokens, prefill
from tokenguard.runner.model import ContiguousKVCache
from tokenguard.runner.model.build import build_model
from tokenguard.runner.model.loader import load_checkpoint
from tokenguard.runner.model.precision import PRECISIONS
from tokenguard.runner.sampling import SamplingParams


def test_generate_tokens_is_lazy_and_matches_the_runner(tiny_llama):
    from tokenguard.runner import LlamaRunner

    config, weights = load_checkpoint(tiny_llama.folder)
    model = build_model(config, weights, PRECISIONS["float32"])
    prompt = [72, 105, 33, 10]
    tokens = list(generate_tokens(model, prompt, SamplingParams(max_tokens=12)))
    assert len(tokens) == 12
    runner = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32")
    expected = runner.generate(prompt, max_tokens=12).token_ids
    assert tokens[: len(expected)] == expected

    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    it = generate_tokens(model, prompt, SamplingParams(max_tokens=100))
    first = [next(it) for _ in range(3)]
    it.close()
    assert first == tokens[:3]
    assert calls[0] == 3  # the prefill and two decode steps: nothing ran ahead


def test_generate_tokens_ends_after_a_stop_token(tiny_llama):
    config, weights = load_checkpoint(tiny_llama.gguf_path)
    model = build_model(config, weights, PRECISIONS["float32"])
    greedy = list(generate_tokens(model, [1, 2, 3], SamplingParams(max_tokens=10)))
    stopped = list(generate_tokens(model, [1, 2, 3], SamplingParams(max_tokens=10), stop_token_ids={greedy[2]}))
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    assert torch.is_inference_mode_enabled() is False  # nothing leaks out of the generator


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_moved_model_computes_with_its_moved_weights(tiny_llama, precision):
    # Layers call kernels bound to their tensors; .to() and friends replace the buffers of
    # quantized layers (as _apply does here), and the layers must follow.
    config, weights = load_checkpoint(tiny_llama.folder)
    model = build_model(config, weights, PRECISIONS[precision])
    ids = torch.tensor([1, 5, 9, 2])

    def logits() -> torch.Tensor:
        cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim, 8, model.dtype)
        return prefill(model, ids, cache)

    before = logits()
    model._apply(torch.clone)
    scales = next(b for b in model.layers[0].wqkv.buffers() if b.is_floating_point())
    scales.mul_(-1)  # only the moved copy changes
    assert not torch.equal(logits(), before)
    scales.mul_(-1)
    assert torch.equal(logits(), before)


def test_a_copied_or_pickled_model_computes_with_its_own_weights(tiny_llama):
    config, weights = load_checkpoint(tiny_llama.folder)
    model = build_model(config, weights, PRECISIONS["int4"])
    ids = torch.tensor([1, 5, 9, 2])

    def logits(m) -> torch.Tensor:
        cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim, 8, m.dtype)
        return prefill(m, ids, cache)

    before = logits(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(other), before)
        next(b for b in other.layers[0].wqkv.buffers() if b.is_floating_point()).mul_(-1)
        assert not torch.equal(logits(other), before)  # the copy's own weights
        assert torch.equal(logits(model), before)  # the original's untouched
