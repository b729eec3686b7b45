"""The native decode step (C++) computes what the model's PyTorch operators compute, for
one sequence and for the engine's batches over a paged cache, and stays out of the way
where it cannot run."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

from tokenguard.runner.engine.paged_cache import PagedKVCache, SequenceSlice
from tokenguard.runner.generate import decode_one_token, prefill
from tokenguard.runner.model import ContiguousKVCache, LlamaModel
from tokenguard.runner.model.build import build_model
from tokenguard.runner.model.loader import load_checkpoint
from tokenguard.runner.model.native import DISABLE_ENV, load_extension
from tokenguard.runner.model.precision import PRECISIONS
from tokenguard.runner.model.quant import DENSE_MIN_ROWS

pytestmark = pytest.mark.skipif(load_extension() is None,
                                reason="the native decode step cannot be built here (no C++ compiler or ninja)")

# Most a logit may move between the two paths, relative to the largest logit: float32
# differs in summation order only; bfloat16 modes round the rotary embedding and SiLU
# once where PyTorch's operators round after each operation (up to about 6% seen on
# random models; a wrong slot, head or chunk moves logits by their whole size).
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.08, "int8": 0.08, "int4": 0.08}


def _model(tiny_llama, mode: str) -> LlamaModel:
    config, weights = load_checkpoint(tiny_llama.folder)
    model = build_model(config, weights, PRECISIONS[mode])
    assert model.native_decode
    return model


def _decode_logits(model: LlamaModel, prompt: list[int], continuation: list[int], native: bool) -> torch.Tensor:
    """Logits of each token of ``continuation`` fed one at a time after ``prompt``."""
    model.use_native_decode(native)
    config = model.config
    cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                              len(prompt) + len(continuation), model.dtype)
    prefill(model, torch.tensor(prompt), cache)
    rows = [decode_one_token(model, torch.tensor([token]), len(prompt) + i, cache)
            for i, token in enumerate(continuation)]
    model.use_native_decode(True)
    return torch.stack(rows)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, mode: str) -> None:
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= TOLERANCE[mode] * scale


@pytest.mark.parametrize("mode", list(TOLERANCE))
def test_one_sequence_decodes_as_through_pytorch(tiny_llama, mode):
    model = _model(tiny_llama, mode)
    prompt, continuation = [72, 105, 33, 10, 7], [40, 41, 200, 3, 3, 3, 17, 90, 91, 92, 5, 6]
    native = _decode_logits(model, prompt, continuation, native=True)
    pytorch = _decode_logits(model, prompt, continuation, native=False)
    _assert_close(native, pytorch, mode)
    if mode == "float32":
        assert torch.equal(native.argmax(-1), pytorch.argmax(-1))


def _paged_step(model: LlamaModel, cache: PagedKVCache, tables: list[list[int]], lengths: list[int],
                tokens: list[int], native: bool) -> torch.Tensor:
    """One engine step in which sequence ``i`` (``lengths[i]`` tokens cached) decodes ``tokens[i]``."""
    model.use_native_decode(native)
    cache.prepare([SequenceSlice(table, cached, 1) for table, cached in zip(tables, lengths, strict=True)])
    hidden = model(torch.tensor(tokens), torch.tensor(lengths), cache)
    model.use_native_decode(True)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("mode", ["float32", "int4"])
@pytest.mark.parametrize(("rows", "first_in_order", "longest"), [
    (1, True, 11), (1, False, 11), (1, False, 250), (3, True, 11), (3, True, 250), (DENSE_MIN_ROWS + 1, True, 11)])
def test_engine_steps_decode_as_through_pytorch(tiny_llama, mode, rows, first_in_order, longest):
    # Sequences of different lengths over a paged pool, their blocks out of order, but
    # the first's in order when asked (one such row reads the pool as a view, any other
    # step in place, in chunks of 128 positions whose softmaxes are merged: 250 takes
    # two); from DENSE_MIN_ROWS rows on the quantized layers multiply their dense copies.
    model = _model(tiny_llama, mode)
    config, block = model.config, 4
    per_row = -(-(longest + 1) // block)
    num_blocks = rows * per_row
    generator = torch.Generator().manual_seed(rows)
    start = per_row if first_in_order else 0
    shuffled = (torch.randperm(num_blocks - start, generator=generator) + start).tolist()
    tables = [list(range(per_row))] if first_in_order else []
    tables += [shuffled[per_row * i : per_row * (i + 1)] for i in range(rows - len(tables))]
    lengths = [longest - 3 * i % 7 for i in range(rows)]
    pools = []
    for _ in range(2):
        cache = PagedKVCache(config.num_layers, config.num_kv_heads, config.head_dim, num_blocks, block, model.dtype)
        torch.manual_seed(0)  # the same cached keys and values in both pools
        cache.k.copy_(torch.randn(cache.k.shape))
        cache.v.copy_(torch.randn(cache.v.shape))
        pools.append(cache)
    tokens = torch.randint(0, config.vocab_size, (rows,), generator=generator).tolist()
    native = _paged_step(model, pools[0], tables, lengths, tokens, native=True)
    pytorch = _paged_step(model, pools[1], tables, lengths, tokens, native=False)
    _assert_close(native, pytorch, mode)
    # both wrote the same new keys and values to the same slots (a stray write would leave
    # a random value where the other pool has another)
    for ours, theirs in ((pools[0].k, pools[1].k), (pools[0].v, pools[1].v)):
        atol = 1e-5 if mode == "float32" else 0.06  # a few bfloat16 steps at the keys' magnitudes
        assert torch.allclose(ours.float(), theirs.float(), rtol=0.02, atol=atol)


def test_a_moved_model_decodes_natively_with_its_moved_weights(tiny_llama):
    model = _model(tiny_llama, "int4")
    before = _decode_logits(model, [1, 2, 3], [4, 5], native=True)
    model._apply(torch.clone)  # what .to() does: every tensor replaced
    assert model.native_decode
    scales = next(b for b in model.layers[0].wqkv.buffers() if b.is_floating_point())
    scales.mul_(-1)
    assert not torch.equal(_decode_logits(model, [1, 2, 3], [4, 5], native=True), before)
    scales.mul_(-1)
    assert torch.equal(_decode_logits(model, [1, 2, 3], [4, 5], native=True), before)


def test_a_copied_or_pickled_model_keeps_the_native_step(tiny_llama):
    model = _model(tiny_llama, "int4")
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.native_decode
        logits = _decode_logits(other, [1, 2, 3], [4, 5], native=True)
        next(b for b in other.layers[0].wqkv.buffers() if b.is_floating_point()).mul_(-1)
        assert not torch.equal(_decode_logits(other, [1, 2, 3], [4, 5], native=True), logits)  # its own weights
    assert model.native_decode


def test_float16_and_turned_off_models_decode_through_pytorch(tiny_llama, monkeypatch):
    config, weights = load_checkpoint(tiny_llama.folder)
    assert not build_model(config, weights, PRECISIONS["float16"]).native_decode  # no float16 kernel here
    assert not build_model(config, weights, PRECISIONS["int4"], native=False).native_decode
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not build_model(config, weights, PRECISIONS["int4"]).native_decode


def test_without_a_compiler_decoding_warns_and_runs_through_pytorch(tiny_llama, tmp_path):
    script = (
        "import logging\n"
        "from pathlib import Path\n"
        "from tokenguard.runner.generate import generate_tokens\n"
        "from tokenguard.runner.model.build import build_model\n"
        "from tokenguard.runner.model.loader import load_checkpoint\n"
        "from tokenguard.runner.model.precision import PRECISIONS\n"
        "from tokenguard.runner.sampling import SamplingParams\n"
        "logging.basicConfig()\n"
        f"model = build_model(*load_checkpoint(Path({str(tiny_llama.folder)!r})), PRECISIONS['int4'])\n"
        "print('native', model.native_decode)\n"
        "print('tokens', len(list(generate_tokens(model, [1, 2, 3], SamplingParams(max_tokens=5)))))\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop(DISABLE_ENV, None)
    for attempt in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "native False" in done.stdout and "tokens 5" in done.stdout
        assert "the native decode step could not be built" in done.stderr
        assert f"{DISABLE_ENV}=0" in done.stderr
        # the failure is remembered: a later process does not compile again
        assert ("an earlier build failed" in done.stderr) == (attempt == 1)
    assert len(list(tmp_path.glob("*/failed.txt"))) == 1


@pytest.mark.slow
def test_a_build_killed_halfway_does_not_block_the_next(tmp_path):
    # A first start interrupted while it compiles leaves the builder's files and lock
    # behind; the next process builds anyway (in a scratch folder it then removes).
    from tokenguard.runner.model import native

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop(DISABLE_ENV, None)
    folder = tmp_path / native._build_name()
    (folder / "build-stale").mkdir(parents=True)
    (folder / "build-stale" / "lock").write_text("")  # PyTorch's own lock of a dead build
    (folder / "build.lock").write_text("")
    script = "from tokenguard.runner.model.native import load_extension\nprint('built', load_extension() is not None)\n"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "built True" in done.stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted(["build-stale", "build.lock", f"{folder.name}.so"])


@pytest.mark.slow
def test_the_bundled_model_decodes_natively_as_through_pytorch(default_gguf):
    config, weights = load_checkpoint(default_gguf)
    model = build_model(config, weights, PRECISIONS["int4"])
    assert model.native_decode
    from tokenguard.tokens import get_tokenizer

    tokenizer = get_tokenizer(str(default_gguf))
    prompt = tokenizer.encode("<|im_start|>user\nName three rivers in Europe.<|im_end|>\n<|im_start|>assistant\n")
    greedy, cache = [], ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim, 200, model.dtype)
    token = int(prefill(model, torch.tensor(prompt), cache).argmax())
    for i in range(40):
        greedy.append(token)
        token = int(decode_one_token(model, torch.tensor([token]), len(prompt) + i, cache).argmax())
    native = _decode_logits(model, prompt, greedy, native=True)
    pytorch = _decode_logits(model, prompt, greedy, native=False)
    assert (native.argmax(-1) == pytorch.argmax(-1)).float().mean().item() >= 0.95
    _assert_close(native, pytorch, "int4")


@pytest.mark.slow
def test_the_bundled_model_decodes_a_paged_batch_natively_as_through_pytorch(default_gguf):
    # SmolLM2's shapes (head_dim 64, three query heads per KV head), three prompts
    # prefilled into interleaved blocks, one long enough for two chunks; then one step
    # decoding all three.
    config, weights = load_checkpoint(default_gguf)
    model = build_model(config, weights, PRECISIONS["int4"])
    rows, block, per_row = 3, 16, 12
    tables = [list(range(i, rows * per_row, rows)) for i in range(rows)]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (n,), generator=generator) for n in (150, 20, 77)]
    cache = PagedKVCache(config.num_layers, config.num_kv_heads, config.head_dim, rows * per_row, block, model.dtype)
    with torch.inference_mode():
        for table, prompt in zip(tables, prompts, strict=True):
            cache.prepare([SequenceSlice(table, 0, len(prompt))])
            model(prompt, torch.arange(len(prompt)), cache)
    twin = PagedKVCache(config.num_layers, config.num_kv_heads, config.head_dim, rows * per_row, block, model.dtype)
    twin.k.copy_(cache.k)
    twin.v.copy_(cache.v)
    lengths = [len(p) for p in prompts]
    native = _paged_step(model, cache, tables, lengths, [100, 200, 300], native=True)
    pytorch = _paged_step(model, twin, tables, lengths, [100, 200, 300], native=False)
    _assert_close(native, pytorch, "int4")
