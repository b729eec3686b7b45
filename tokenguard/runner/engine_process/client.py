"""The runner's side of the engine process: :class:`EngineProcess` starts it and offers
the caller-side methods of :class:`~tokenguard.runner.engine.Engine` (``submit``,
``cancel``, ``touch``, ``end_session``, ``stats``, ``shutdown``) over pipes.

Why a process: with OpenMP (torch's CPU threading), every OS thread that has run
parallel torch work keeps a pool of workers until it exits, and once the pooled workers
of a process outnumber the cores, every pool stops spinning between parallel regions.
The engine runs thousands of small parallel regions per token and then pays a wake-up on
each: measured, decode fell to about 0.55x after the caller's thread ran ten matrix
products, for good. In a process of its own the engine's pool is the only one.

The child is a fresh interpreter (``python -c``), as with multiprocessing's ``spawn``
(fork is unsafe once torch has threads) but without re-running the parent's
``__main__``: a script that builds a runner at top level, with no
``if __name__ == "__main__"`` guard, works as it did. It gets the parent's ``sys.path``.
Requests go down its stdin; its messages come back on a pipe of their own, not its
stdout (which is our stderr), so nothing the child prints, not even a ``sitecustomize``
or a C library writing before the engine starts, can garble the stream.

One reader thread in the runner's process dispatches what the engine sends: each step's
tokens to the waiting sequences, answers to the waiting calls, log records to the
runner's loggers. When the process ends without being asked to (killed, out of memory,
crashed) every waiting request and every later call raises :class:`EngineDied`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import multiprocessing.spawn
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO, Any

from tokenguard.errors import TokenGuardError
from tokenguard.runner.engine.engine import check_fits
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
    read_frame,
)
from tokenguard.runner.errors import EngineDied
from tokenguard.runner.model import LlamaConfig
from tokenguard.runner.sampling import SamplingParams

_BOOTSTRAP = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from tokenguard.runner.engine_process.worker import main; main(int(sys.argv[2]))"
)
_EXIT_TIMEOUT_S = 30.0  # after Shutdown: the current step, then the process's exit

Event = tuple[str, Any]


class RemoteSequence:
    """The runner's handle on one request in the engine process."""

    __slots__ = ("cached_prompt_tokens", "emit", "engine", "finished", "rid")

    def __init__(self, rid: int, emit: Callable[[Event], None], engine: EngineProcess) -> None:
        self.rid = rid
        self.emit = emit
        self.engine = engine  # the process serving it (a runner may have started another since)
        self.cached_prompt_tokens = 0  # prompt tokens the engine took from the session's KV
        self.finished = False  # its finish or error was delivered


class EngineProcess:
    """An engine in a process of its own, driven through the methods of ``Engine``.

    The constructor starts the process and returns at once; :meth:`wait_ready` waits
    for the model to be built (raising what failed, e.g. :class:`UnsupportedModel`), so
    the caller can load its tokenizer meanwhile.
    """

    def __init__(self, recipe: EngineRecipe) -> None:
        events, child_end = os.pipe()
        try:
            self._process = subprocess.Popen(
                [multiprocessing.spawn.get_executable(), "-c", _BOOTSTRAP, json.dumps(sys.path), str(child_end)],
                stdin=subprocess.PIPE, stdout=2, pass_fds=(child_end,),  # its prints: to our stderr
            )
        except BaseException:
            os.close(events)
            raise
        finally:
            os.close(child_end)  # the child holds its own copy: the stream ends when the child does
        self._events = os.fdopen(events, "rb")
        assert self._process.stdin is not None
        self.pid = self._process.pid
        self._writer = FrameWriter(self._process.stdin)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sequences: dict[int, RemoteSequence] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._ready: Future[Ready] = Future()
        self._stopping = False
        self._ended: tuple[type[TokenGuardError], str] | None = None  # why no call can be served
        self.capacity_tokens = 0
        self._send(recipe)
        _live.add(self)
        self._reader = threading.Thread(target=self._read, args=(self._events,),
                                        name="tokenguard-engine-reader", daemon=True)
        self._reader.start()

    def wait_ready(self) -> LlamaConfig:
        """Wait until the engine serves; the config of the model it built. On failure
        the process is stopped and the error raised."""
        try:
            ready = self._ready.result()
        except BaseException:
            self.shutdown()
            raise
        return ready.config

    @property
    def exitcode(self) -> int | None:
        """The process's exit status (negative: the signal that ended it); None while it runs."""
        return self._process.poll()

    @property
    def died(self) -> bool:
        """Whether the process ended without being asked to (killed, crashed, out of memory)."""
        return self._ended is not None and self._ended[0] is EngineDied

    # -- the Engine's caller-side methods -------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_token_ids: frozenset[int],
               emit: Callable[[Event], None], session: str | None = None) -> RemoteSequence:
        """Queue a request; its events go to ``emit`` from the reader thread."""
        check_fits(len(prompt_ids), params.max_tokens, self.capacity_tokens)
        with self._lock:
            self._check_serving()
            seq = RemoteSequence(next(self._ids), emit, self)
            self._sequences[seq.rid] = seq
        self._send(Submit(seq.rid, prompt_ids, params, stop_token_ids, session))
        return seq

    def cancel(self, seq: RemoteSequence, *, keep_session: bool = False) -> None:
        """Stop ``seq`` and free its blocks (``keep_session``: hand them to its session);
        returns once the engine has done so. No-op once it finished or the engine is gone."""
        with self._lock:
            if seq.finished or self._sequences.pop(seq.rid, None) is None:
                return
            call, answer = self._new_call()
        self._send(Cancel(call, seq.rid, keep_session))
        if threading.current_thread() is not self._reader:
            with contextlib.suppress(TokenGuardError):  # the engine is gone: nothing of it is left to free
                answer.result()

    def touch(self, session: str) -> bool:
        return bool(self._call(lambda call: Touch(call, session)))

    def end_session(self, session: str) -> None:
        self._call(lambda call: EndSession(call, session))

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self._call(Stats)
        return stats

    def shutdown(self, wait: bool = True) -> None:
        """Stop the engine: pending requests fail, the process exits and is reaped.
        ``wait=False`` only asks (a garbage-collected runner): the reader thread reaps it."""
        with self._lock:
            first, self._stopping = not self._stopping, True
        if first:
            self._send(Shutdown())
        if not wait or threading.current_thread() is self._reader:
            return
        self._reader.join(timeout=_EXIT_TIMEOUT_S)
        if self._reader.is_alive():  # stuck: stop it the hard way
            self._process.kill()
            self._reader.join()

    # -- requests and answers -------------------------------------------------------------

    def _new_call(self) -> tuple[int, Future[Any]]:
        """An id and the future its answer settles (under the lock)."""
        call, answer = next(self._ids), Future[Any]()
        self._calls[call] = answer
        return call, answer

    def _call(self, make: Callable[[int], object]) -> Any:
        with self._lock:
            self._check_serving()
            call, answer = self._new_call()
        self._send(make(call))
        return answer.result()

    def _check_serving(self) -> None:
        if self._ended is not None:
            raise self._error()
        if self._stopping:
            raise TokenGuardError("the engine is shut down")

    def _error(self) -> TokenGuardError:
        """A fresh exception saying why nothing more can be served."""
        assert self._ended is not None
        kind, message = self._ended
        return kind(message)

    def _send(self, message: object) -> None:
        with contextlib.suppress(OSError, ValueError):  # the process is gone: the reader fails what waits
            self._writer.send(message)

    # -- reader thread ---------------------------------------------------------------------

    def _read(self, stream: IO[bytes]) -> None:
        cause: BaseException | None = None
        try:
            while True:
                self._dispatch(read_frame(stream))
        except EOFError:
            pass
        except BaseException as e:  # noqa: BLE001 - a garbled stream: stop the process, fail what waits
            cause = e
            self._process.kill()
        finally:
            self._ended_with(cause)

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Step):
            for update in message.updates:
                self._deliver(update)
        elif isinstance(message, Reply):
            with self._lock:
                answer = self._calls.pop(message.call, None)
            if answer is not None:
                if message.error is not None:
                    answer.set_exception(message.error)
                else:
                    answer.set_result(message.value)
        elif isinstance(message, Log):
            _log(message.record)
        elif isinstance(message, Ready):
            self.capacity_tokens = message.capacity_tokens
            self._ready.set_result(message)
        elif isinstance(message, StartFailed):
            self._ready.set_exception(message.error)

    def _deliver(self, update: Update) -> None:
        seq = self._sequences.get(update.rid)
        if seq is None:
            return  # cancelled: the tokens of its last steps are dropped
        seq.cached_prompt_tokens = update.cached_prompt_tokens
        ended = update.error is not None or update.finish is not None
        if ended:
            with self._lock:
                self._sequences.pop(update.rid, None)
                seq.finished = True
        try:
            for token in update.tokens:
                seq.emit(("token", token))
            if update.error is not None:
                seq.emit(("error", update.error))
            elif update.finish is not None:
                seq.emit(("finish", update.finish))
        except Exception:  # noqa: BLE001 - its consumer is gone (a closed event loop): stop its work
            if not ended:
                self.cancel(seq)

    def _ended_with(self, cause: BaseException | None) -> None:
        """The process's output ended: reap it, then fail whatever still waits."""
        try:
            code = self._process.wait(timeout=_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        for close in (self._writer.close, self._events.close):
            with contextlib.suppress(OSError, ValueError):  # unsent bytes of a process that is gone
                close()
        with self._lock:
            if self._stopping and cause is None:
                self._ended = (TokenGuardError, "the engine is shut down")
            else:
                self._ended = (EngineDied, _death_notice(self.pid, code, cause, self._ready.done()))
            sequences, self._sequences = self._sequences, {}
            calls, self._calls = self._calls, {}
            for seq in sequences.values():
                seq.finished = True
        for seq in sequences.values():
            with contextlib.suppress(Exception):  # a consumer that is gone needs no news
                seq.emit(("error", self._error()))
        for answer in calls.values():
            answer.set_exception(self._error())
        if not self._ready.done():
            self._ready.set_exception(self._error())
        _live.discard(self)


def _death_notice(pid: int, code: int, cause: BaseException | None, served: bool) -> str:
    """Why the engine ended, for :class:`EngineDied`."""
    if cause is not None:
        how = f"sent a message that could not be read ({type(cause).__name__}: {cause}) and was stopped"
    elif code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    if not served:
        why = " (its stderr says why)" if code > 0 else ""
        return f"the runner's engine process (pid {pid}) {how} while loading the model{why}"
    return (f"the runner's engine process (pid {pid}) {how}; its requests failed (sessions' KV is lost), "
            "and the runner starts a new engine at its next call")


def _log(fields: dict[str, Any]) -> None:
    """Handle a record of the engine's with the logger of the same name in this process."""
    logger = logging.getLogger(fields.get("name"))
    if logger.isEnabledFor(fields.get("levelno", logging.INFO)):
        logger.handle(logging.makeLogRecord(fields))


# Engine processes still running. At interpreter exit each is stopped and reaped.
_live: set[EngineProcess] = set()


@atexit.register
def _stop_live_engines() -> None:
    for engine in list(_live):
        engine.shutdown()
