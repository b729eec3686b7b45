"""The KV pool's bookkeeping: fixed-size blocks, a free list and reference counts.

A sequence's keys and values live in blocks named by its block table; blocks are
shared by reference count (a session's kept prefix and the turn that reuses it) and go
back to the free list when the last holder lets go. Only ids move here; the tensors
live in :class:`~tokenguard.runner.engine.paged_cache.PagedKVCache`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from tokenguard.errors import ConfigError


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for a request; the scheduler preempts or waits."""


class BlockManager:
    """Allocates ``num_blocks`` blocks of ``block_size`` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"need at least one block of one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks, each with one reference; raises :class:`OutOfBlocks`."""
        with self._lock:
            if count > len(self._free):
                raise OutOfBlocks(f"need {count} blocks, {len(self._free)} free of {self.num_blocks}")
            blocks = [self._free.popleft() for _ in range(count)]
            for block in blocks:
                self._refs[block] = 1
            return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add a reference to each of ``blocks`` (another holder of the same KV)."""
        with self._lock:
            for block in blocks:
                if self._refs[block] < 1:
                    raise ValueError(f"block {block} is free; only held blocks can be shared")
                self._refs[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each of ``blocks``; a block nobody holds is free again."""
        with self._lock:
            for block in blocks:
                if self._refs[block] < 1:
                    raise ValueError(f"block {block} released more often than it was held")
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._refs[block]
