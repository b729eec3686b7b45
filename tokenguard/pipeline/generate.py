"""Step 6, generate: the one loop body every guarded stream runs, sync or async.

:class:`Generation` does no I/O: the streams in :mod:`~tokenguard.pipeline.stream`
pull chunks from the backend and hand each to :meth:`Generation.feed`, which passes it
through the call's chunk watchers (the output cap first) and says what text to pass
on and whether to stop. When the stream ends, however it ends, :meth:`Generation.outcome`
says how: the :class:`Outcome` that the meter, settle and remember steps are given.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenguard.backends import BackendUsage, Chunk
from tokenguard.errors import BudgetExceeded, InputTooLong
from tokenguard.pipeline.steps import Stop, Watch

__all__ = ["Generation", "Outcome"]

# Errors that mean the caller stopped the call, not that it failed.
_CANCELS = (KeyboardInterrupt, GeneratorExit, asyncio.CancelledError)
# The stop reason written for a call refused before the backend ran.
_REFUSALS: dict[type[BaseException], str] = {
    InputTooLong: "input_too_long",
    BudgetExceeded: "budget_exceeded",
}


@dataclass(slots=True)
class Outcome:
    """How one call ended, whatever became of it.

    ``text`` is the reply's text; ``streamed`` all the text the backend sent, which is
    what was generated and is metered (it is longer than ``text`` when a watcher left a
    repeated tail out of the reply, or stopped inside a piece). ``spent`` says whether
    the backend used tokens: it produced something (text, a finish reason or usage),
    finished without an error, or was cancelled after it had been asked (it had read
    the prompt). ``stopped_early`` that a watcher ended the stream before the
    backend would have, sparing the rest of ``max_output_tokens``. ``backend_usage``
    is what the backend reported of its own counts, if anything.
    """

    text: str = ""
    stop_reason: str = "stop"
    spent: bool = True
    backend_usage: BackendUsage | None = None
    error: BaseException | None = None
    streamed: str = ""
    stopped_early: bool = False
    #: The tool calls the answer made (OpenAI's shape), or ``None``.
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the call delivered its reply (not failed, not cancelled)."""
        return self.error is None and self.stop_reason != "cancelled"

    @classmethod
    def refused(cls, error: BaseException) -> Outcome:
        """A call stopped before the backend ran (``"input_too_long"``,
        ``"budget_exceeded"``, or ``"error"`` for anything else)."""
        reason = next((r for kind, r in _REFUSALS.items() if isinstance(error, kind)), "error")
        return cls(stop_reason=reason, spent=False, error=error)


class Generation:
    """One call's generate step: chunks in, text to pass on out.

    Watchers see each text piece in order; the first that returns a stop reason ends
    the stream (:attr:`stopped`), and the stream must then close the backend.
    """

    __slots__ = ("_calls", "_dropped", "_latest", "_parts", "_received", "_watches", "asked", "calls_tools",
                 "finish_reason", "produced", "stop", "usage")

    def __init__(self, watches: Sequence[Watch]) -> None:
        self._watches = list(watches)
        self._parts: list[str] = []
        self._received: list[str] = []  # all the backend's text, what was not passed on included
        #: The backend's own finish reason, from its last chunk.
        self.finish_reason: str | None = None
        self.calls_tools = False
        self._calls: list[dict[str, Any]] = []  # the tool calls, in the order they began
        self._latest: dict[int, dict[str, Any]] = {}  # by a part's index (or position): the latest call begun
        #: The counts the backend reported, if it did.
        self.usage: BackendUsage | None = None
        #: True once the backend produced any output (text, a finish reason or usage).
        self.produced = False
        #: True once the backend was asked for output: it has the prompt, so a call
        #: cancelled from then on is billed its prompt even before any output came.
        self.asked = False
        #: How a watcher ended the stream, once one did.
        self.stop: Stop | None = None
        self._dropped = 0  # characters at the end of the text that the reply leaves out

    @property
    def stopped(self) -> bool:
        """True once a watcher ended the stream: close the backend, pass nothing more."""
        return self.stop is not None

    @property
    def text(self) -> str:
        """The text passed on so far."""
        return "".join(self._parts)

    def feed(self, chunk: Chunk) -> str:
        """The part of ``chunk``'s text to pass on (``""`` when nothing)."""
        if chunk.usage is not None:
            self.usage = chunk.usage
            self.produced = True
        self.calls_tools = self.calls_tools or chunk.calls_tools
        # A tool call's text is generated: metered, though not passed on. Of parts, only
        # what they add (a server may repeat a call's name in every part).
        said = "".join(self._join(position, part) for position, part in enumerate(chunk.tool_calls))
        said = said if chunk.tool_calls else chunk.tool_text  # a chunk that made its own (legacy calls)
        if said:
            self._received.append(said)
            self.produced = True
        if chunk.finish_reason is not None:
            # An answer that called tools ends in them, whatever the server says.
            self.finish_reason = "tool_calls" if self.calls_tools and chunk.finish_reason == "stop" else (
                chunk.finish_reason)
            self.produced = True
        piece = chunk.text
        if piece:
            self._received.append(piece)  # generated, so metered, whatever a watcher keeps of it
        if not piece or self.stopped:
            return ""
        self.produced = True
        for watch in self._watches:
            verdict = watch.feed(piece)
            if isinstance(verdict, Stop):
                # The watchers after it still read what it keeps: a loop inside the part the
                # output cap keeps of a whole answer is still a loop (the later stop wins).
                self.stop, piece, self._dropped = verdict, verdict.keep, verdict.drop
                if not piece:
                    break
                continue
            piece = verdict
        if piece:
            self._parts.append(piece)
        return piece

    def _join(self, position: int, part: dict[str, Any]) -> str:
        """Add one part of a tool call to the call it belongs to, as OpenAI streams them:
        the call of its ``index`` (a whole answer's calls have none: their position),
        its arguments appended, its id, type and name taken where they first come; the
        text it added (the name, once, and the arguments).

        Servers that stray from that are read too. Some repeat the id, type or name in
        every part: taken once. Some number every call 0, or none: a part with another
        id, or with a name when its call is whole (another name, or arguments that are
        a JSON value already), begins a call, and the parts after it go on with that
        one. Some send the arguments so far in every part: a part whose arguments begin
        with all the call has replaces them.
        """
        index = part.get("index")
        key = index if isinstance(index, int) else position
        part_id = part.get("id") if isinstance(part.get("id"), str) and part["id"] else None
        function = part.get("function") or {}
        name: str = function["name"] if isinstance(function.get("name"), str) else ""
        arguments: str = function["arguments"] if isinstance(function.get("arguments"), str) else ""
        call = self._latest.get(key)
        if call is None or _begins_a_call(call, part_id, name):
            call = self._latest[key] = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            self._calls.append(call)
        call["id"] = call["id"] or part_id
        if isinstance(part.get("type"), str) and part["type"]:
            call["type"] = part["type"]
        added = ""
        if name and not call["function"]["name"]:
            call["function"]["name"] = added = name
        so_far = call["function"]["arguments"]
        if so_far and arguments.startswith(so_far):  # the arguments so far, sent again with more
            arguments = arguments[len(so_far):]
        call["function"]["arguments"] = so_far + arguments
        return added + arguments

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The answer's tool calls, whole, in order (``None`` when it made none)."""
        return list(self._calls) or None

    def outcome(self, error: BaseException | None = None, *, cancelled: bool = False) -> Outcome:
        """How the call ended: ``error`` is what ended it, if anything; ``cancelled``
        that the caller closed it early (a cancelling error such as
        ``asyncio.CancelledError`` means the same)."""
        cancelled = cancelled or isinstance(error, _CANCELS)
        passed = self.text
        early = False
        if cancelled:
            reason = "cancelled"
        elif error is not None:
            reason = "error"
        elif self.stop is not None:
            # It spared tokens only if the backend had more to say: not when its whole
            # answer had come (a returned string, a completion, a stream's last chunk).
            reason, early = self.stop.reason, self.stop.saves and self.finish_reason is None
        else:  # a backend that ends without a reason has finished: its answer, or its tool calls
            reason = self.finish_reason or ("tool_calls" if self.calls_tools else "stop")
        return Outcome(
            text=passed[: len(passed) - self._dropped] if self._dropped else passed,
            stop_reason=reason,
            spent=self.produced or (self.asked if cancelled else error is None),
            backend_usage=self.usage,
            error=error,
            streamed="".join(self._received),
            stopped_early=early,
            tool_calls=self.tool_calls,
        )


def _begins_a_call(call: dict[str, Any], part_id: str | None, name: str) -> bool:
    """Whether a tool-call part under ``call``'s index is another call (see
    :meth:`Generation._join`)."""
    if part_id and call["id"]:
        return part_id != call["id"]
    if not name or not call["function"]["name"]:
        return False
    if name != call["function"]["name"]:
        return True
    try:
        json.loads(call["function"]["arguments"])
    except ValueError:
        return False  # the call is not whole yet: its name said again
    return True
