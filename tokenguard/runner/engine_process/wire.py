"""The messages between a runner and its engine process, and how they travel.

Each message is pickled into one frame: a 4-byte little-endian length, then the bytes.
Requests go down the child's stdin; the child answers on a dup of its stdout (its fd 1
itself is pointed at stderr, so a stray ``print`` cannot corrupt the stream).

Down (runner -> engine): :class:`Submit` (no answer: its results come as updates),
:class:`Cancel`, :class:`Touch`, :class:`EndSession` and :class:`Stats` (each answered by
a :class:`Reply` with the same ``call`` id), :class:`Shutdown`. The first frame is the
:class:`~tokenguard.runner.engine_process.recipe.EngineRecipe`.

Up (engine -> runner): :class:`Ready` or :class:`StartFailed` once, then :class:`Step`
(one per engine step: every sequence's new tokens, finish reason or error),
:class:`Reply` and :class:`Log` (a log record of the engine's, re-emitted by the runner's
own loggers).
"""

from __future__ import annotations

import pickle
import struct
import threading
from typing import IO, Any, NamedTuple

from tokenguard.errors import BackendError
from tokenguard.runner.model import LlamaConfig
from tokenguard.runner.sampling import SamplingParams

_HEADER = struct.Struct("<I")

# -- runner -> engine ---------------------------------------------------------------------


class Submit(NamedTuple):
    rid: int  # the runner's id for the request; its updates carry it
    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    session: str | None


class Cancel(NamedTuple):
    """Stop ``rid`` and free its blocks (or hand them to its session); answered once done."""

    call: int
    rid: int
    keep_session: bool


class Touch(NamedTuple):
    call: int
    session: str


class EndSession(NamedTuple):
    call: int
    session: str


class Stats(NamedTuple):
    call: int


class Shutdown(NamedTuple):
    """Fail what is pending, send its last step, and exit."""


# -- engine -> runner ---------------------------------------------------------------------


class Ready(NamedTuple):
    config: LlamaConfig  # of the model as built: the runner never reads the weights
    capacity_tokens: int


class StartFailed(NamedTuple):
    error: BaseException


class Update(NamedTuple):
    """What one step did for one sequence."""

    rid: int
    tokens: list[int]
    finish: str | None  # "stop" or "length" when it finished
    error: BaseException | None
    cached_prompt_tokens: int


class Step(NamedTuple):
    updates: list[Update]


class Reply(NamedTuple):
    call: int
    value: Any
    error: BaseException | None = None


class Log(NamedTuple):
    record: dict[str, Any]  # a LogRecord's attributes, message already formatted


# -- frames -------------------------------------------------------------------------------


class FrameWriter:
    """Sends messages on a binary stream, one whole frame at a time from any thread."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._stream.write(_HEADER.pack(len(data)) + data)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.close()


def read_frame(stream: IO[bytes]) -> Any:
    """The next message; ``EOFError`` once the other side has closed the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the stream ended")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the stream ended inside a frame")
    return pickle.loads(data)


def portable(error: BaseException) -> BaseException:
    """``error`` itself when it survives pickling (the caller then gets the very type
    the engine raised), else a :class:`BackendError` naming its type and message."""
    try:
        pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send a stand-in
        return BackendError(f"the engine failed: {type(error).__name__}: {error}")
    return error
