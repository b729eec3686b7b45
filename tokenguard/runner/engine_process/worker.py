"""The engine process's side: build the engine from the recipe, then serve the runner.

The main thread reads requests; the engine's own thread runs every step and, after
each, sends what the step did for every sequence as one :class:`Step` message. Cancels
wait for the engine (up to a step), so each gets a short thread of its own and the
main thread keeps reading. The ``tokenguard`` loggers are forwarded to the runner.

When the runner's end of the pipe closes (its process exited, however), the engine
shuts down and this process exits: an engine process never outlives its runner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Any

from tokenguard.runner.engine import Sequence
from tokenguard.runner.engine_process.recipe import EngineRecipe
from tokenguard.runner.engine_process.wire import (
    Cancel,
    EndSession,
    FrameWriter,
    Log,
    Ready,
    Reply,
    Shutdown,
    StartFailed,
    Stats,
    Step,
    Submit,
    Touch,
    Update,
    portable,
    read_frame,
)


def main(events_fd: int) -> None:
    """Entry point of the engine process (see :mod:`.client` for how it is started):
    requests arrive on stdin, messages leave on the pipe ``events_fd``."""
    # Ctrl-C in a terminal reaches the whole process group: the runner decides when the
    # engine stops (Shutdown, or its end of the pipe closing), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    events = FrameWriter(os.fdopen(events_fd, "wb"))
    _forward_logs(events)
    try:
        recipe: EngineRecipe = read_frame(requests)
    except EOFError:
        return  # the runner went away before sending anything
    try:
        server = EngineServer(recipe, events)
    except BaseException as e:  # noqa: BLE001 - the runner raises it in its constructor
        events.send(StartFailed(portable(e)))
        return
    events.send(Ready(server.engine.model.config, server.engine.capacity_tokens))
    server.serve(requests)
    # Served and shut down; every message is flushed. The interpreter's teardown (torch's
    # takes ~0.4 s) has nothing left to save, and the runner's close() waits for this exit.
    sys.stderr.flush()
    os._exit(0)


@dataclass(slots=True)
class _Pending:
    """One sequence's events of the current step."""

    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: BaseException | None = None


class EngineServer:
    """An :class:`~tokenguard.runner.engine.Engine` answering the runner's messages."""

    def __init__(self, recipe: EngineRecipe, events: FrameWriter) -> None:
        self._events = events
        # Guards the request table against the engine thread's flush: a request is in the
        # table before the step that first reports on it is sent.
        self._lock = threading.Lock()
        self._sequences: dict[int, Sequence] = {}
        self._pending: dict[int, _Pending] = {}  # touched by the engine thread only
        self.engine = recipe.start_engine(on_step=self._flush)

    def serve(self, requests: IO[bytes]) -> None:
        """Answer requests until Shutdown or the end of the stream; then stop the engine,
        which fails whatever is still pending (sent as a last step)."""
        try:
            while True:
                try:
                    message = read_frame(requests)
                except EOFError:
                    return
                if isinstance(message, Shutdown):
                    return
                self._handle(message)
        finally:
            self.engine.shutdown()

    def _handle(self, message: Any) -> None:
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Cancel):
            threading.Thread(target=self._cancel, args=(message,), name="tokenguard-engine-cancel",
                             daemon=True).start()
        elif isinstance(message, Touch):
            self._answer(message.call, functools.partial(self.engine.touch, message.session))
        elif isinstance(message, EndSession):
            self._answer(message.call, functools.partial(self.engine.end_session, message.session))
        elif isinstance(message, Stats):
            self._answer(message.call, self.engine.stats)
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")

    def _submit(self, request: Submit) -> None:
        emit = functools.partial(self._collect, request.rid)
        try:
            with self._lock:
                self._sequences[request.rid] = self.engine.submit(
                    request.prompt_ids, request.params, request.stop_token_ids, emit, request.session)
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            self._send(Step([Update(request.rid, [], None, portable(e), 0)]))

    def _cancel(self, request: Cancel) -> None:
        self._answer(request.call, functools.partial(self._stop, request.rid, request.keep_session))

    def _stop(self, rid: int, keep_session: bool) -> None:
        with self._lock:
            seq = self._sequences.get(rid)
        if seq is None:
            return  # finished already: its last step is sent or on its way
        self.engine.cancel(seq, keep_session=keep_session)  # returns once its blocks are free
        with self._lock:
            self._sequences.pop(rid, None)

    def _answer(self, call: int, compute: Any) -> None:
        try:
            value = compute()
        except Exception as e:  # noqa: BLE001 - raised in the runner's caller
            self._send(Reply(call, None, portable(e)))
            return
        self._send(Reply(call, value))

    # -- engine thread --------------------------------------------------------------------

    def _collect(self, rid: int, event: tuple[str, object]) -> None:
        """A sequence's event: kept for the end of the step."""
        pending = self._pending.get(rid)
        if pending is None:
            pending = self._pending[rid] = _Pending()
        kind, value = event
        if kind == "token":
            pending.tokens.append(value)  # type: ignore[arg-type]
        elif kind == "finish":
            pending.finish = value  # type: ignore[assignment]
        else:
            pending.error = portable(value)  # type: ignore[arg-type]

    def _flush(self) -> None:
        """The step is over: send every sequence's events in one message."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        updates = []
        with self._lock:
            for rid, p in pending.items():
                seq = self._sequences.get(rid)
                if p.finish is not None or p.error is not None:
                    self._sequences.pop(rid, None)
                cached = seq.cached_prompt_tokens if seq is not None else 0
                updates.append(Update(rid, p.tokens, p.finish, p.error, cached))
        self._send(Step(updates))

    def _send(self, message: object) -> None:
        with contextlib.suppress(OSError, ValueError):  # the runner is gone: its stream's end stops us
            self._events.send(message)


class _ForwardLogs(logging.Handler):
    """Sends each record to the runner, whose own loggers (same names) handle it."""

    def __init__(self, events: FrameWriter) -> None:
        super().__init__(logging.DEBUG)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: v for k, v in vars(record).items() if isinstance(v, str | int | float | None)}
            fields.update(msg=record.getMessage(), args=None, exc_info=None)
            if record.exc_info and not record.exc_text:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            self._events.send(Log(fields))
        except Exception:  # noqa: BLE001 - logging must never break the engine
            self.handleError(record)


def _forward_logs(events: FrameWriter) -> None:
    """Every ``tokenguard`` record goes to the runner, which filters by its own levels."""
    logger = logging.getLogger("tokenguard")
    logger.addHandler(_ForwardLogs(events))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
