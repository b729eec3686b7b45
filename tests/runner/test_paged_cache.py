"""Paged attention gives what one contiguous cache per sequence gives; blocks are counted."""

from __future__ import annotations

import pytest
import torch

from tokenguard.runner.engine.block_manager import BlockManager, OutOfBlocks
from tokenguard.runner.engine.paged_cache import PagedKVCache, SequenceSlice
from tokenguard.runner.model.kv_cache import ContiguousKVCache

LAYERS, HEADS, KV_HEADS, DIM, BLOCK = 2, 6, 2, 8, 4


def test_block_manager_counts_references() -> None:
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    a = manager.allocate(3)
    assert manager.num_free == 1 and manager.blocks_for(9) == 3
    manager.share(a[:2])
    manager.release(a)
    assert manager.num_free == 2  # two blocks still held by the sharer
    manager.release(a[:2])
    assert manager.num_free == 4
    with pytest.raises(OutOfBlocks, match="need 5 blocks, 4 free"):
        manager.allocate(5)
    with pytest.raises(ValueError, match="released more often"):
        manager.release([0])


def _random_steps(seed: int, lengths: list[list[int]]) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per sequence, per step: (q, k, v) for that step's new tokens."""
    g = torch.Generator().manual_seed(seed)
    return [
        [tuple(torch.randn(n, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)) for n in steps]
        for steps in lengths
    ]


def test_paged_attention_matches_contiguous_caches() -> None:
    # Three sequences: a chunked prompt, a one-token prompt, a long prompt; then decodes.
    schedule = [[5, 3, 1, 1], [1, 1, 1, 1], [9, 1, 1, 1]]
    steps = _random_steps(0, schedule)
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    paged = PagedKVCache(LAYERS, KV_HEADS, DIM, 16, BLOCK, torch.float32)
    contiguous = [ContiguousKVCache(LAYERS, KV_HEADS, DIM, 32, torch.float32) for _ in schedule]
    tables: list[list[int]] = [[] for _ in schedule]
    cached = [0] * len(schedule)
    for step in range(len(schedule[0])):
        batch, qs, ks, vs = [], [], [], []
        for seq, parts in enumerate(steps):
            q, k, v = parts[step]
            need = manager.blocks_for(cached[seq] + len(q)) - len(tables[seq])
            tables[seq] += manager.allocate(need)
            batch.append(SequenceSlice(tables[seq], cached[seq], len(q)))
            qs.append(q), ks.append(k), vs.append(v)
        paged.prepare(batch)
        for layer in range(LAYERS):
            got = paged.attend(layer, torch.cat(qs), torch.cat(ks) + layer, torch.cat(vs) - layer)
            row = 0
            for seq in range(len(schedule)):
                n = len(qs[seq])
                contiguous[seq].begin(cached[seq], n)
                want = contiguous[seq].attend(layer, qs[seq], ks[seq] + layer, vs[seq] - layer)
                torch.testing.assert_close(got[row : row + n], want, atol=1e-5, rtol=1e-5)
                row += n
        for seq in range(len(schedule)):
            cached[seq] += len(qs[seq])
    assert manager.num_free == 16 - sum(len(t) for t in tables)
