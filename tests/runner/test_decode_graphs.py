"""The fixed-shape decode step (what the engine captures in CUDA graphs) against the
eager paged step, run eagerly on CPU: same logits, same cache contents, padding rows
confined to the spare block."""

from __future__ import annotations

import pytest
import torch

from tokenguard.runner.engine.decode_graphs import DecodeGraphs
from tokenguard.runner.engine.paged_cache import PagedKVCache, SequenceSlice
from tokenguard.runner.model.build import build_model
from tokenguard.runner.model.loader import load_checkpoint
from tokenguard.runner.model.precision import PRECISIONS

BLOCK = 16
NUM_BLOCKS = 24
# Prompts of different lengths on scattered, non-consecutive blocks; the 15-token one
# crosses into its second block at the first decode step.
PROMPTS = [[3, 9, 27, 81, 243], [7 + i % 200 for i in range(15)], [11 + (5 * i) % 250 for i in range(37)]]
TABLES = [[5, 17], [2, 9], [20, 1, 12, 7]]


@pytest.fixture(scope="module")
def model(tiny_llama):
    config, weights = load_checkpoint(tiny_llama.folder)
    return build_model(config, weights, PRECISIONS["float32"])


def _new_cache(model) -> PagedKVCache:
    c = model.config
    return PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, NUM_BLOCKS, BLOCK, model.dtype)


def _prefill(model, cache: PagedKVCache) -> list[int]:
    """Prefill every prompt; the greedy next token of each."""
    firsts = []
    with torch.inference_mode():
        for prompt, table in zip(PROMPTS, TABLES, strict=True):
            cache.prepare([SequenceSlice(table, 0, len(prompt))])
            hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), cache)
            firsts.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return firsts


def test_fixed_shape_decode_matches_the_eager_step(model):
    eager, fixed = _new_cache(model), _new_cache(model)
    tokens = _prefill(model, eager)
    assert _prefill(model, fixed) == tokens
    graphs = DecodeGraphs(model, fixed, max_batch=8, max_context=512, capture=False)
    lengths = [len(p) for p in PROMPTS]
    with torch.inference_mode():
        for _ in range(6):
            lengths = [n + 1 for n in lengths]  # each context now includes its new token
            eager.prepare([SequenceSlice(t, n - 1, 1) for t, n in zip(TABLES, lengths, strict=True)])
            positions = torch.tensor([n - 1 for n in lengths])
            expected = model.compute_logits(model(torch.tensor(tokens), positions, eager))
            got = graphs.run(tokens, lengths, TABLES)
            assert got.shape == expected.shape  # padding rows cut off
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            tokens = expected.argmax(-1).tolist()
    owned = NUM_BLOCKS * BLOCK  # every slot but the spare block's
    torch.testing.assert_close(fixed.k[:, :, :owned], eager.k[:, :, :owned], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed.v[:, :, :owned], eager.v[:, :, :owned], rtol=1e-5, atol=1e-5)
    assert list(graphs._steps) == [(4, 256)]  # three sequences padded to the bucket of four


def test_buckets_cover_the_limits(model):
    graphs = DecodeGraphs(model, _new_cache(model), max_batch=100, max_context=1000, capture=False)
    assert graphs.batch_buckets[-1] == 100 and graphs.context_buckets == [256, 512, 1008]
    assert graphs.fits(100, 1000) and not graphs.fits(101, 10) and not graphs.fits(1, 1009)
