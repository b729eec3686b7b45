"""A cached answer as stored, and the reply a hit becomes."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tokenguard.accounting.usage import Reply, Usage

if TYPE_CHECKING:
    from tokenguard.pipeline.call import Call

FORMAT = 1
#: Replies worth serving again: the model finished, or stopped at the requested length.
CACHEABLE_STOPS = frozenset({"stop", "length"})


def worth_keeping(reply: Reply) -> bool:
    """A complete, fresh answer in text: not itself served from a cache, not cut or
    failed, not empty (a refusal or a filtered answer comes with no text), and calling
    no tools (a hit answers with text only: the calls would be lost)."""
    return (not reply.cached and reply.stop_reason in CACHEABLE_STOPS and bool(reply.text)
            and not reply.tool_calls)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a call answered and what it cost, filed under its partition.

    Stored as JSON, not pickled: reading an entry never runs code, and an entry that
    does not parse is simply a miss.
    """

    partition: str
    text: str
    stop_reason: str
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    request_id: str
    created: float

    @classmethod
    def of(cls, partition: str, reply: Reply) -> CachedAnswer:
        usage = reply.usage
        return cls(partition, reply.text, reply.stop_reason, reply.model, usage.input_tokens, usage.output_tokens,
                   usage.cost_usd, reply.request_id, time.time())

    def dumps(self) -> str:
        # ASCII: a lone surrogate in the text (a model's broken output) is kept as an
        # escape, where a store's UTF-8 would refuse it.
        return json.dumps({"format": FORMAT, **asdict(self)})

    @classmethod
    def loads(cls, data: object) -> CachedAnswer:
        """Parse a stored entry; ``ValueError`` when it is not one."""
        if not isinstance(data, (str, bytes)):
            raise ValueError(f"a cache entry is JSON text, got {type(data).__name__}")
        fields = json.loads(data)
        if not isinstance(fields, dict) or fields.pop("format", None) != FORMAT:
            raise ValueError("not a tokenguard cache entry of this format")
        try:
            answer = cls(**fields)
        except TypeError as e:
            raise ValueError(f"cache entry fields: {e}") from None
        counts = (answer.input_tokens, answer.output_tokens)
        cost = answer.cost_usd
        if not (isinstance(answer.text, str) and isinstance(answer.stop_reason, str)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
                and (cost is None or (isinstance(cost, (int, float)) and not isinstance(cost, bool)
                                      and 0 <= cost < math.inf))
                and (answer.model is None or isinstance(answer.model, str))):
            raise ValueError("cache entry has fields of the wrong type")  # its savings would go in the ledger
        return answer

    def reply(self, call: Call) -> Reply:
        """The reply a hit gives ``call``: this answer's text, nothing billed, and the
        original call's tokens and cost as savings."""
        usage = Usage(cost_usd=0.0, saved_tokens=self.input_tokens + self.output_tokens, saved_usd=self.cost_usd,
                      depth=call.depth, latency_s=time.perf_counter() - call.started)
        return Reply(self.text, "cache", list(call.messages), usage, call.request_id, self.model, cached=True,
                     cached_stop_reason=self.stop_reason)
