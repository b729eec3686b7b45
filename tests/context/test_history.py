"""Session histories: bounded in sessions, messages and time; expiry and ending a
session free the history, and the bundled runner's KV blocks with it. The persistent
ones run twice: in a SQLite file and in Redis (a real redis-server, tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenguard import ConfigError, Guard
from tokenguard.backends import BundledRunner
from tokenguard.context import SessionHistory


class Clock:
    """Time for the test to move (the history's TTL logic is what is tested)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _turn(i: int) -> tuple[dict, dict]:
    return {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}


def test_what_a_caller_changes_in_a_history_it_got_is_not_the_history_s():
    history = SessionHistory()
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}]}
    history.append("s", {"role": "user", "content": "my card is 4111"}, call)
    got = history.get("s")
    got[0]["content"] = "[redacted]"
    got[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # a backend parsing in place
    assert history.get("s") == [{"role": "user", "content": "my card is 4111"}, call]


def test_a_session_expires_ttl_after_its_last_use_and_a_heartbeat_keeps_it():
    clock = Clock()
    history = SessionHistory(ttl_s=10, clock=clock)
    history.append("a", *_turn(1))
    history.append("b", *_turn(1))
    clock.now = 8
    assert history.touch("a")  # a heartbeat at 8
    clock.now = 12
    assert len(history.get("a")) == 2  # used 4 s ago
    assert history.get("b") == [] and not history.touch("b")  # unused for 12 s: gone
    clock.now = 30
    assert len(history) == 0


def test_expired_and_evicted_sessions_are_reported_for_freeing():
    clock = Clock()
    freed: list[str] = []
    history = SessionHistory(max_sessions=2, ttl_s=10, on_expire=freed.append, clock=clock)
    history.append("a", *_turn(1))
    history.append("b", *_turn(1))
    history.append("c", *_turn(1))  # over max_sessions: "a", the least recently used, goes
    assert freed == ["a"]
    clock.now = 11
    assert history.get("c") == [] and sorted(freed) == ["a", "b", "c"]


def test_sessions_and_messages_are_bounded():
    history = SessionHistory(max_sessions=3, max_messages=4, ttl_s=None)
    history.append("s", {"role": "system", "content": "Be brief."})
    for i in range(10):
        history.append("s", *_turn(i))
    kept = history.get("s")
    assert len(kept) == 4 and kept[0]["role"] == "system" and kept[-1]["content"] == "a9"
    for name in ("x", "y", "z"):
        history.append(name, *_turn(0))
    assert len(history) == 3 and history.get("s") == []  # the least recently used went


def test_a_bound_takes_a_call_s_results_with_it():
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "a", "content": "18 C"}
    history = SessionHistory(max_messages=2, ttl_s=None)
    answer = {"role": "assistant", "content": "Sunny."}
    history.append("s", {"role": "user", "content": "Weather?"}, call, result, answer)
    # The call went with the oldest messages: its result, sent alone, would be refused.
    assert history.get("s") == [answer]


def test_bad_bounds_are_config_errors():
    with pytest.raises(ConfigError):
        SessionHistory(ttl_s=0)
    with pytest.raises(ConfigError):
        SessionHistory(max_sessions=0)


def test_end_session_forgets_the_history():
    guard = Guard(lambda messages, max_tokens: "ok", model="gpt-4o", session_ttl_s=60)
    guard.chat("hi", session="s")
    assert guard.history.ttl_s == 60 and guard.touch("s")
    guard.end_session("s")
    assert guard.history.get("s") == [] and not guard.touch("s")


@pytest.mark.slow
def test_an_expired_session_frees_the_runner_s_kv_blocks(bundled_runner):
    clock = Clock()
    backend = BundledRunner(bundled_runner)
    history = SessionHistory(ttl_s=5, on_expire=backend.end_session, clock=clock)
    guard = Guard(backend, max_output_tokens=4, history=history)
    free_before = bundled_runner.stats()["kv_blocks_free"]
    guard.chat("Say hi.", session="expiring")
    assert bundled_runner.stats()["kv_blocks_free"] < free_before
    clock.now = 6
    assert not guard.touch("expiring")  # expired: its history and its KV blocks are freed
    assert bundled_runner.stats()["kv_blocks_free"] == free_before


@pytest.mark.slow
def test_end_session_frees_the_runner_s_kv_blocks(bundled_runner):
    guard = Guard(BundledRunner(bundled_runner), max_output_tokens=4)
    free_before = bundled_runner.stats()["kv_blocks_free"]
    guard.chat("Say hi.", session="kv-test")
    assert bundled_runner.stats()["kv_blocks_free"] < free_before  # the session keeps its KV
    guard.end_session("kv-test")
    assert bundled_runner.stats()["kv_blocks_free"] == free_before
    assert guard.history.get("kv-test") == []


@pytest.fixture(params=["sqlite", "redis"])
def stored_at(request, tmp_path):
    """Where a persistent history lives: a SQLite file, or a Redis URL with a prefix of
    this test's own (only the Redis run needs the server)."""
    if request.param == "sqlite":
        return tmp_path / "sessions.sqlite"
    return request.getfixturevalue("redis_url")


def test_a_persistent_history_survives_a_restart_and_is_shared_by_processes(stored_at):
    path = stored_at
    first = SessionHistory(path=path)
    first.append("s", {"role": "user", "content": "人工智能 🚀"}, {"role": "assistant", "content": "ok"})
    script = (
        "from tokenguard.context import SessionHistory\n"
        f"SessionHistory(path={str(path)!r}).append('s', {{'role': 'user', 'content': 'from another process'}})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    restarted = SessionHistory(path=path)
    assert [m["content"] for m in restarted.get("s")] == ["人工智能 🚀", "ok", "from another process"]
    restarted.clear("s")
    assert SessionHistory(path=path).get("s") == []


def test_a_persistent_history_keeps_its_bounds_in_the_file(stored_at):
    clock = Clock()
    path = stored_at
    history = SessionHistory(max_sessions=2, max_messages=3, ttl_s=10, clock=clock, path=path)
    for session in ("a", "b", "c"):
        clock.now += 1
        history.append(session, *({"role": "user", "content": str(i)} for i in range(5)))
    assert len(history) == 2
    assert SessionHistory(path=path, clock=clock).get("a") == []  # the least recently used is gone from the file
    assert [m["content"] for m in SessionHistory(path=path, clock=clock).get("c")] == ["2", "3", "4"]
    clock.now = 30
    assert SessionHistory(ttl_s=10, clock=clock, path=path).get("b") == []  # expired, even after a restart
    assert len(SessionHistory(ttl_s=10, clock=clock, path=path)) == 0


def test_a_guard_continues_a_persisted_chat_after_a_restart(stored_at):
    path = stored_at

    def echo(messages, max_tokens):
        return f"seen {len(messages)}"

    Guard(echo, model="gpt-4o", history=SessionHistory(path=path)).chat("My name is Ada.", session="ada")
    reply = Guard(echo, model="gpt-4o", history=SessionHistory(path=path)).chat("Who am I?", session="ada")
    assert reply.text == "seen 3" and reply.messages[0]["content"] == "My name is Ada."
