"""The serving engine: continuous batching over a paged KV cache.

:class:`Engine` runs the model (:mod:`tokenguard.runner.model`) on a background thread;
:class:`Scheduler` picks each step's tokens, :class:`BlockManager` hands out the blocks
of :class:`PagedKVCache`, and :class:`SessionStore` keeps a chat session's KV between
turns. A request is a :class:`Sequence`.
"""

from tokenguard.runner.engine.block_manager import BlockManager, OutOfBlocks
from tokenguard.runner.engine.engine import Engine, KVCacheTooSmall
from tokenguard.runner.engine.paged_cache import PagedKVCache, SequenceSlice
from tokenguard.runner.engine.scheduler import Scheduler
from tokenguard.runner.engine.sequence import Sequence, Status
from tokenguard.runner.engine.sessions import SessionStore

__all__ = [
    "BlockManager",
    "Engine",
    "KVCacheTooSmall",
    "OutOfBlocks",
    "PagedKVCache",
    "Scheduler",
    "Sequence",
    "SequenceSlice",
    "SessionStore",
    "Status",
]
