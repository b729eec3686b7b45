"""Isolation under concurrency: many threads, each its own user and session, share one
guard; no cache entry, session history or retrieval index crosses from one to another."""

from __future__ import annotations

import threading

import pytest

from tokenguard import Guard
from tokenguard.cache import ExactCache
from tokenguard.context import Retrieval

USERS = 12


def _answer(messages, max_tokens, **params):
    """Answers with what it was sent, so a reply shows whose context produced it."""
    return "|".join(str(m["content"]) for m in messages)


def _in_threads(work, count):
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i):
        try:
            start.wait()
            work(i)
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_caches_and_histories_never_cross_users_or_sessions(tmp_path):
    pytest.importorskip("faiss")
    retrieval = Retrieval(k=2)
    guard = Guard(_answer, model="gpt-4o", cache=ExactCache(tmp_path / "cache"), context=retrieval,
                  max_context_tokens=120)
    replies: dict[int, list] = {}

    def work(i):
        user, session = f"user-{i}", f"session-{i}"
        secret = f"secret-{i}-{i * 7919}"
        out = [guard.chat(f"My secret code is {secret}.", session=session, user=user, temperature=0.0)]
        for turn in range(12):
            out.append(guard.chat(f"Small talk number {turn}.", session=session, user=user, temperature=0.0))
        out.append(guard.chat("What is my secret code?", session=session, user=user, temperature=0.0))
        # The same question as every other user asks: a cache hit only for an identical own call.
        out.append(guard.complete("What is the capital of France?", user=user, temperature=0.0))
        out.append(guard.complete("What is the capital of France?", user=user, temperature=0.0))
        replies[i] = out

    _in_threads(work, USERS)
    for i, out in replies.items():
        own = f"secret-{i}-{i * 7919}"
        others = [f"secret-{j}-{j * 7919}" for j in range(USERS) if j != i]
        for reply in out:
            text = reply.text + "".join(str(m["content"]) for m in reply.messages)
            assert not any(other in text for other in others), (i, text)
        assert own in out[-3].text  # recalled from its own session's index
        assert not out[-2].cached and out[-1].cached  # its own entry, not another user's
        history = guard.history.get(f"session-{i}")
        assert own in str(history[0]["content"])
        assert not any(other in str(m["content"]) for m in history for other in others)
    assert len(retrieval._states) == USERS  # one index per session
