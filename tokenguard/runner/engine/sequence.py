"""One request inside the engine: its tokens, its KV blocks and where its output goes."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenguard.runner.sampling import Sampler, SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """A prompt and its reply so far.

    ``tokens`` is prompt plus generated ids; ``num_cached`` of them have their keys and
    values in the blocks of ``block_table``. The engine calls ``emit`` from its thread
    with each event: ``("token", id)`` per generated token, then ``("finish", reason)``
    (``"stop"`` or ``"length"``) or ``("error", exception)``.
    """

    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    emit: Callable[[tuple[str, object]], None]
    session: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    cached_prompt_tokens: int = 0
    sampler: Sampler | None = None  # made in the engine thread, before the first token
    admitted: bool = False  # has met the scheduler once (its session KV is settled)
    cancelled: bool = False
    keep_session_on_cancel: bool = False
    #: Set once the engine holds no blocks for this sequence any more.
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def num_uncached(self) -> int:
        """Tokens still to run through the model (1 while decoding)."""
        return len(self.tokens) - self.num_cached
