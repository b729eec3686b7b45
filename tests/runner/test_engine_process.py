"""The engine in its own process: one message per step, a killed engine is a clear error
(never a hang), and nothing outlives close(), a dropped runner or the interpreter's exit.

Waits run in threads joined with a timeout: a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from waiting import wait_until

from tokenguard.errors import InputTooLong, TokenGuardError
from tokenguard.runner import EngineDied, LlamaRunner
from tokenguard.runner.engine_process.wire import Step

TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals on the engine process")


@pytest.fixture
def runner(tiny_llama):
    """A runner of the test's own: these tests kill or close its engine."""
    runner = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32", batch_window_ms=5)
    yield runner
    runner.close()


class InThread:
    """``fn`` running in a thread of its own; :meth:`outcome` waits for it."""

    def __init__(self, fn) -> None:
        self._box: dict[str, object] = {}
        self._thread = threading.Thread(target=self._work, args=(fn,), daemon=True)
        self._thread.start()

    def _work(self, fn) -> None:
        try:
            self._box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self._box["error"] = e

    def outcome(self):
        """Its return value or exception; the test fails if it hangs."""
        self._thread.join(TIMEOUT_S)
        assert not self._thread.is_alive(), "hung"
        return self._box.get("error", self._box.get("value"))


def outcome_in_thread(fn):
    return InThread(fn).outcome()


def gone(pid: int) -> bool:
    """No such process: it exited and was reaped (a zombie would still answer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_engine_fails_the_waiting_stream_and_the_next_call_starts_a_new_one(runner):
    runner.stop_token_ids = frozenset()  # decode all 240 tokens unless stopped
    expected = runner.generate("again", max_tokens=4).text
    assert runner.touch("s") is False
    runner.generate("a session", max_tokens=2, session="s")
    stream = runner.stream([1, 2, 3], max_tokens=240)
    next(stream)
    dead = runner.engine
    os.kill(dead.pid, signal.SIGKILL)  # mid-generation
    error = outcome_in_thread(lambda: list(stream))
    assert isinstance(error, EngineDied) and isinstance(error, TokenGuardError)
    assert f"pid {dead.pid}" in str(error) and "SIGKILL" in str(error)
    assert dead.exitcode == -signal.SIGKILL and dead.died
    # The next call waits for a new engine process; the dead one's sessions are gone.
    assert outcome_in_thread(lambda: runner.generate("again", max_tokens=4).text) == expected
    assert runner.engine is not dead and not runner.engine.died and gone(dead.pid)
    assert runner.touch("s") is False
    assert runner.stats()["kv_blocks_free"] == runner.stats()["kv_blocks_total"]
    stream.close()  # cancelling a request of the dead engine touches nothing of the new one
    assert runner.generate("again", max_tokens=4).text == expected
    runner.close()
    assert gone(runner.engine.pid)


def test_threads_that_find_the_engine_dead_start_one_new_engine(runner):
    expected = runner.generate("hello", max_tokens=4).text
    dead = runner.engine
    others = _engine_workers() - {dead.pid}  # other tests' runners
    os.kill(dead.pid, signal.SIGKILL)
    assert wait_until(lambda: dead.died)
    calls = [InThread(lambda: runner.generate("hello", max_tokens=4).text) for _ in range(4)]
    assert [call.outcome() for call in calls] == [expected] * 4
    assert runner.engine is not dead
    assert _engine_workers() - others == {runner.engine.pid}


def test_a_closed_runner_does_not_restart_its_dead_engine(runner):
    others = _engine_workers() - {runner.engine.pid}
    os.kill(runner.engine.pid, signal.SIGKILL)
    assert wait_until(lambda: runner.engine.died)
    runner.close()
    assert isinstance(outcome_in_thread(lambda: runner.generate("hello", max_tokens=4)), EngineDied)
    assert _engine_workers() <= others


def test_an_async_call_that_finds_the_engine_dead_restarts_it_off_the_event_loop(runner):
    expected = runner.generate("hello", max_tokens=4).text
    dead = runner.engine
    os.kill(dead.pid, signal.SIGKILL)
    assert wait_until(lambda: dead.died)
    restarted_in: list[threading.Thread] = []
    restart = runner._serving_engine

    def recorded_restart():
        restarted_in.append(threading.current_thread())
        return restart()

    runner._serving_engine = recorded_restart

    async def main():
        with pytest.raises(InputTooLong):  # a prompt that cannot fit fails at once, before any restart
            runner.astream([1] * runner.context_length)
        loop_thread = threading.current_thread()
        text = (await runner.agenerate("hello", max_tokens=4)).text
        return loop_thread, text

    loop_thread, text = outcome_in_thread(lambda: asyncio.run(main()))
    assert text == expected and runner.engine is not dead
    assert restarted_in and restarted_in[0] is not loop_thread  # the model loaded in a worker thread


def _engine_workers() -> set[int]:
    """Live engine processes of this test process (children running the engine worker),
    zombies excluded."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"engine_process.worker" in cmdline:
            pids.add(int(entry.name))
    return pids


def test_calls_waiting_on_a_frozen_engine_fail_once_it_is_killed(runner):
    pid = runner.engine.pid
    os.kill(pid, signal.SIGSTOP)  # frozen: nothing sent from now on is answered
    try:
        generating = InThread(lambda: runner.generate("hello", max_tokens=8))
        counting = InThread(runner.stats)
        time.sleep(0.2)  # both requests are sent and wait
    finally:
        os.kill(pid, signal.SIGKILL)
    assert isinstance(generating.outcome(), EngineDied)
    assert isinstance(counting.outcome(), EngineDied)


def test_close_fails_what_waits_and_leaves_no_process_or_thread(runner):
    pid, reader = runner.engine.pid, runner.engine._reader
    runner.stop_token_ids = frozenset()
    stream = runner.stream([1, 2, 3], max_tokens=240)
    next(stream)
    draining = InThread(lambda: list(stream))  # blocked on the engine mid-generation
    runner.close()
    error = draining.outcome()
    assert isinstance(error, TokenGuardError) and "shut down" in str(error)
    assert runner.engine.exitcode == 0 and gone(pid)
    assert not reader.is_alive()
    with pytest.raises(TokenGuardError, match="shut down"):
        runner.generate("after close", max_tokens=2)
    runner.close()  # twice is fine


def test_a_dropped_runner_stops_its_engine(tiny_llama):
    runner = LlamaRunner(tiny_llama.folder, device="cpu", dtype="float32")
    engine = runner.engine
    assert runner.generate("hi", max_tokens=2).token_ids
    del runner
    gc.collect()
    assert wait_until(lambda: engine.exitcode is not None and gone(engine.pid))


def test_interpreter_exit_stops_the_engine_of_a_script_without_a_main_guard(tiny_llama, tmp_path):
    # Built at the top level of a script (no `if __name__ == "__main__"`) and never closed.
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        from tokenguard.runner import LlamaRunner
        runner = LlamaRunner({str(tiny_llama.folder)!r}, device="cpu", dtype="float32")
        print(runner.engine.pid, len(runner.generate("hi", max_tokens=3).token_ids), flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    pid, generated = map(int, done.stdout.split())
    assert generated >= 1
    assert gone(pid)


def test_what_the_engine_process_prints_never_reaches_the_message_stream(tiny_llama, tmp_path):
    # A sitecustomize runs in every new interpreter before our code can redirect anything.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, sys
        sys.stdout.write("a banner on stdout\\n"); sys.stdout.flush()
        os.write(1, b"and from C\\n")
    """))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        from tokenguard.runner import LlamaRunner
        with LlamaRunner({str(tiny_llama.folder)!r}, device="cpu", dtype="float32") as runner:
            print(len(runner.generate("hi", max_tokens=3).token_ids), flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr
    # the script's own sitecustomize printed once to its stdout; the engine's went to stderr
    assert done.stdout.splitlines()[-1] == "3"
    assert done.stderr.count("a banner on stdout") == 1 and done.stderr.count("and from C") == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_an_engine_never_outlives_its_runners_process(tiny_llama, tmp_path):
    # The runner's process is killed outright (no atexit): its engine sees its pipe close and exits.
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from tokenguard.runner import LlamaRunner
        runner = LlamaRunner({str(tiny_llama.folder)!r}, device="cpu", dtype="float32")
        print(runner.engine.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid = int(done.stdout)

    def exited() -> bool:  # gone, or a zombie of an init that reaps late: either way not running
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state in ("Z", "X")

    assert wait_until(exited)


def test_each_step_is_one_message_for_all_its_sequences(runner):
    steps: list[list[int]] = []
    dispatch = runner.engine._dispatch

    def recording(message):
        if isinstance(message, Step):
            steps.append([update.rid for update in message.updates])
        dispatch(message)

    runner.engine._dispatch = recording
    runner.stop_token_ids = frozenset()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    results: list[object] = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, runner.generate(prompts[i], max_tokens=48)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert all(len(r.token_ids) == 48 for r in results)  # type: ignore[attr-defined]
    assert all(len(rids) == len(set(rids)) for rids in steps)  # one update per sequence per step
    assert max(len(rids) for rids in steps) > 1  # sequences decoding together share a message
    assert len(steps) < 4 * 48


def test_stats_and_sessions_across_the_process_boundary(runner):
    before = runner.stats()
    assert set(before) == {"running", "waiting", "kv_blocks_total", "kv_blocks_free", "kv_block_size", "sessions",
                           "prefix_tokens_reused", "preemptions"}
    assert all(isinstance(v, int) for v in before.values())
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    first = runner.chat(messages, max_tokens=8, session="sea")
    again = runner.chat([*messages, {"role": "assistant", "content": first.text},
                         {"role": "user", "content": "More."}], max_tokens=8, session="sea")
    assert first.cached_prompt_tokens == 0 < again.cached_prompt_tokens
    stats = runner.stats()
    assert stats["sessions"] == 1 and stats["kv_blocks_free"] < stats["kv_blocks_total"]
    assert stats["prefix_tokens_reused"] == before["prefix_tokens_reused"] + again.cached_prompt_tokens
    assert runner.touch("sea") and not runner.touch("no such session")
    runner.end_session("sea")
    stats = runner.stats()
    assert stats["sessions"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert runner.context_length == 256 and runner.config.vocab_size == 258  # from the engine's ready message
