"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step the running sequences go first (one token each while decoding, the next
chunk of a long prompt while prefilling), then waiting sequences join while the step's
token budget and the free blocks allow. When blocks run out, least recently used
session KV goes first, then the newest running sequence is preempted: its blocks are
freed and it is recomputed later from its tokens. A turn of a chat session starts on the
blocks the session's last turn left (shared, by reference count).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from tokenguard.runner.engine.block_manager import BlockManager
from tokenguard.runner.engine.sequence import Sequence, Status
from tokenguard.runner.engine.sessions import SessionStore


class Scheduler:
    def __init__(self, blocks: BlockManager, sessions: SessionStore, copy_slots: Callable[[int, int, int], None], *,
                 max_batched_tokens: int = 512, max_running: int = 64) -> None:
        self.blocks = blocks
        self.copy_slots = copy_slots  # (source block, target block, slots): copies cached KV
        self.sessions = sessions
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_tokens_reused = 0
        self.preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def active_sessions(self) -> set[str]:
        return {s.session for s in (*self.running, *self.waiting) if s.session is not None}

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's batch: ``(sequence, new tokens)`` in layout order."""
        self._drop_cancelled()
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_batched_tokens
        for seq in list(self.running):  # oldest first
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncached, budget)
            if self._allocate(seq, seq.num_cached + n, allow_preempt=True):
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not seq.admitted:
                self._reuse_session(seq)
                seq.admitted = True
            n = min(seq.num_uncached, budget)
            # Leave a block of headroom per running sequence, so that admitting this one
            # does not force a preemption at the very next decode step.
            if not self._allocate(seq, seq.num_cached + n, allow_preempt=False, headroom=len(self.running)):
                # A sequence that waits holds no blocks: the session KV it would start on
                # may be what a sequence preempted ahead of it needs (both would wait forever).
                self._forget_reuse(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence, *, keep_session: bool) -> None:
        """``seq`` is done: keep its KV for its session (unless the session ended while
        it ran), or free it."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if keep_session and seq.session is not None and seq.num_cached and self.sessions.is_open(seq.session):
            self.blocks.release(self.sessions.keep(seq.session, seq.tokens[: seq.num_cached], seq.block_table))
        else:
            self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.released.set()

    # -- blocks -------------------------------------------------------------------------

    def _allocate(self, seq: Sequence, num_tokens: int, *, allow_preempt: bool, headroom: int = 0) -> bool:
        """Give ``seq`` blocks for ``num_tokens`` while leaving ``headroom`` free: first by
        evicting session KV, then (``allow_preempt``) by preempting newer sequences.
        False when that was not enough, or when ``seq`` itself was preempted."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        while need + headroom > self.blocks.num_free:
            evicted = self.sessions.evict_lru()
            if evicted:
                self.blocks.release(evicted)
                continue
            if not allow_preempt:
                return False
            victim = self.running[-1]  # the newest running sequence
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table += self.blocks.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self._forget_reuse(seq)  # it is recomputed from its tokens, its prompt's reused part too
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _forget_reuse(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks: it starts again from its tokens (on its session's KV,
        when it is admitted again); the prompt tokens it reused are no longer reused."""
        self.blocks.release(seq.block_table)
        self.prefix_tokens_reused -= seq.cached_prompt_tokens
        seq.block_table, seq.num_cached, seq.cached_prompt_tokens = [], 0, 0
        seq.admitted = False

    def _reuse_session(self, seq: Sequence) -> None:
        """Start ``seq`` on its session's kept KV, up to the longest common prefix.

        Whole blocks of the prefix are shared (one more reference each); the partly
        used last block is copied, since ``seq`` writes its own tokens after the prefix.
        """
        if seq.session is None:
            return
        kept = self.sessions.open(seq.session)
        if kept is None:
            return
        # At least the last prompt token must run, to produce the next-token logits.
        limit = min(len(kept.tokens), len(seq.tokens) - 1)
        common = 0
        while common < limit and kept.tokens[common] == seq.tokens[common]:
            common += 1
        full, partial = divmod(common, self.blocks.block_size)
        seq.block_table = kept.blocks[:full]
        self.blocks.share(seq.block_table)
        if partial:
            if self.blocks.num_free:
                copy = self.blocks.allocate(1)[0]
                self.copy_slots(kept.blocks[full], copy, partial)
                seq.block_table.append(copy)
            else:  # no room for the copy: reuse whole blocks only
                common -= partial
        seq.num_cached = seq.cached_prompt_tokens = common
        self.prefix_tokens_reused += common

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self.running, *self.waiting) if s.cancelled]:
            self.finish(seq, keep_session=seq.keep_session_on_cancel)
