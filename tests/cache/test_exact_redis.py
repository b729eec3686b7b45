"""ExactCache on Redis (a real redis-server, tests/conftest.py): an answer stored by one
process is a hit in another; partitions and tenants never share an entry; entries
expire by Redis's TTL; the size bound deletes the least recently stored first; a
corrupted entry or an unreachable server is a miss, never an error."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from one_function import answers_here, script_prelude
from test_exact import GREEDY, Answers  # the same backend and parameters as the disk cache's tests

from tokenguard import Guard
from tokenguard.cache import ExactCache
from tokenguard.cache.redis_entries import RedisEntries
from tokenguard.errors import ConfigError


def _entries(cache: ExactCache) -> RedisEntries:
    assert cache._redis is not None
    return cache._redis


def test_a_redis_url_selects_redis(redis_url):
    with ExactCache(redis_url, ttl=30) as cache:
        assert cache.path is None and isinstance(cache._redis, RedisEntries)
        assert repr(cache) == f"ExactCache({redis_url.split('?')[0]!r}, scope='user', ttl=30)"


def test_an_answer_stored_by_one_process_is_a_hit_in_another(redis_url):
    """This process answers Q1; another process gets it from Redis without calling its
    function, and answers Q2, which this process then gets. The functions are defined
    in ``__main__`` with one name and one code in both processes, so their cache
    identity is one."""
    answers, calls = answers_here("the first process")
    with ExactCache(redis_url) as cache:
        first = Guard(answers, model="gpt-4o-mini", cache=cache).complete("Q1?", **GREEDY)
        assert not first.cached and len(cache) == 1
    script = script_prelude("the second process") + textwrap.dedent(f"""
        from tokenguard import Guard
        from tokenguard.cache import ExactCache
        with ExactCache({redis_url!r}) as cache:
            guard = Guard(answers, model="gpt-4o-mini", cache=cache)
            hit = guard.complete("Q1?", temperature=0)
            print(hit.cached, hit.text, hit.usage.input_tokens, hit.usage.saved_tokens > 0, sep="|")
            print(guard.complete("Q2?", temperature=0).cached, CALLS)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["True|written by the first process|0|True", "False ['Q2?']"]
    with ExactCache(redis_url) as reopened:
        reply = Guard(answers, model="gpt-4o-mini", cache=reopened).complete("Q2?", **GREEDY)
        assert reply.cached and reply.text == "written by the second process" and len(reopened) == 2
    assert calls == ["Q1?"]


def test_users_sessions_and_everyone_are_partitions(redis_server, redis_url):
    fn = Answers()
    with ExactCache(redis_url) as per_user:
        guard = Guard(fn, model="gpt-4o-mini", cache=per_user)
        alice = guard.complete("Q?", user="alice", **GREEDY)
        bob = guard.complete("Q?", user="bob", **GREEDY)
        assert not bob.cached and bob.text != alice.text
        assert guard.complete("Q?", user="alice", **GREEDY).text == alice.text
        assert guard.complete("Q?", user="bob", **GREEDY).text == bob.text
        anonymous = guard.complete("Q?", **GREEDY)
        assert not anonymous.cached and fn.calls == 3
        # One key range per partition, under the tenant's prefix.
        prefix = _entries(per_user).prefix
        entries = sorted(k for k in redis_server.client().keys(f"{prefix}exact:*"))
        assert [k.rsplit(":", 1)[0] for k in entries] == [
            f"{prefix}exact:user:", f"{prefix}exact:user:alice", f"{prefix}exact:user:bob"]
    with ExactCache(redis_url, scope="session") as per_session:
        guard = Guard(fn, model="gpt-4o-mini", cache=per_session)
        guard.complete("Q?", session="s1", **GREEDY)
        assert not guard.complete("Q?", session="s2", **GREEDY).cached
        assert guard.complete("Q?", session="s1", **GREEDY).cached
        guard.complete("Q?", **GREEDY)
        assert not guard.complete("Q?", **GREEDY).cached  # no session: not cached
    with ExactCache(redis_url, scope="global") as shared:
        guard = Guard(fn, model="gpt-4o-mini", cache=shared)
        guard.complete("Q?", user="alice", **GREEDY)
        assert guard.complete("Q?", user="bob", **GREEDY).cached


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(st.sampled_from(["alice", "bob", None]), st.sampled_from(["s1", "s2", None]),
                                st.sampled_from(["Q1", "Q2"])), min_size=1, max_size=10),
       scope=st.sampled_from(["user", "session", "global"]))
def test_no_entry_crosses_its_partition(redis_server, calls, scope):
    """Whatever the order of calls, a hit only returns an answer first given in the same
    partition: each answer names the user and session that produced it."""
    caller = {"tag": ""}

    def answer(messages, *, max_tokens, **params):
        return f"{caller['tag']}|{messages[-1]['content']}"

    with ExactCache(redis_server.url(prefix=f"h{uuid.uuid4().hex[:12]}:"), scope=scope) as cache:
        guard = Guard(answer, model="gpt-4o-mini", cache=cache)
        for user, session, question in calls:
            caller["tag"] = f"{user}/{session}"
            reply = guard.complete(question, user=user, session=session, **GREEDY)
            origin_user, origin_session = reply.text.split("|")[0].split("/")
            if scope == "user":
                assert origin_user == str(user)
            elif scope == "session":
                assert not reply.cached or origin_session == str(session)


def test_tenants_by_prefix_never_share_an_entry(redis_server):
    fn = Answers()
    with ExactCache(redis_server.url(prefix=f"acme{uuid.uuid4().hex[:6]}:"), scope="global") as acme, \
            ExactCache(redis_server.url(prefix=f"umbrella{uuid.uuid4().hex[:6]}:"), scope="global") as umbrella:
        Guard(fn, model="gpt-4o-mini", cache=acme).complete("Q?", **GREEDY)
        assert not Guard(fn, model="gpt-4o-mini", cache=umbrella).complete("Q?", **GREEDY).cached
        assert (len(acme), len(umbrella)) == (1, 1)
        acme.clear()
        assert (len(acme), len(umbrella)) == (0, 1)
        assert redis_server.client().keys(f"{_entries(acme).prefix}*") == []  # entries and index gone
        assert Guard(fn, model="gpt-4o-mini", cache=umbrella).complete("Q?", **GREEDY).cached


def test_entries_expire_by_redis_ttl(redis_server, redis_url):
    fn = Answers()
    with ExactCache(redis_url, ttl=60) as lasting:
        guard = Guard(fn, model="gpt-4o-mini", cache=lasting)
        call = guard.prepare("Q?", **GREEDY)
        guard.complete("Q?", **GREEDY)
        key = lasting.key(call)
        assert key is not None
        assert 55_000 < redis_server.client().pttl(_entries(lasting).entry_key("user:", key)) <= 60_000
    with ExactCache(redis_url, ttl=0.2) as brief:
        guard = Guard(fn, model="gpt-4o-mini", cache=brief)
        guard.complete("Short-lived?", **GREEDY)
        assert guard.complete("Short-lived?", **GREEDY).cached
        time.sleep(0.3)
        assert not guard.complete("Short-lived?", **GREEDY).cached  # expired: answered again
        assert fn.calls == 3
        time.sleep(0.3)
        assert len(brief) == 1  # the lasting entry; expired ones leave the count


def test_a_ttl_that_is_no_finite_number_of_seconds_is_refused_on_disk_and_in_redis(redis_url, tmp_path):
    for path in (tmp_path / "answers", redis_url):
        for ttl in (math.inf, math.nan, 0, -1):
            with pytest.raises(ConfigError, match="ttl"):
                ExactCache(path, ttl=ttl)
    fn = Answers()
    with ExactCache(redis_url, ttl=1e300) as lasting:  # longer than Redis's expiries hold: as good as never
        guard = Guard(fn, model="gpt-4o-mini", cache=lasting)
        guard.complete("Q?", **GREEDY)
        assert guard.complete("Q?", **GREEDY).cached and fn.calls == 1


def test_the_size_bound_deletes_the_least_recently_stored_first(redis_server, redis_url):
    """``size_limit`` bytes of key + value: storing past it deletes the oldest-stored
    entries, through the Guard as on disk."""
    with ExactCache(redis_server.url(prefix=f"probe{uuid.uuid4().hex[:8]}:")) as probe:
        Guard(Answers(), model="gpt-4o-mini", cache=probe).complete("Q0?", **GREEDY)
        (one,) = (int(v) for v in redis_server.client().hvals(f"{_entries(probe).prefix}exact-index:size"))
        probe.clear()
    with ExactCache(redis_url, size_limit=3 * one + one // 2) as cache:  # room for three
        fn = Answers()
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        for i in range(5):
            guard.complete(f"Q{i}?", **GREEDY)
        assert len(cache) == 3
        used = int(redis_server.client().get(f"{_entries(cache).prefix}exact-index:bytes"))
        assert 3 * one - 60 < used <= 3 * one + one // 2  # sizes vary by a few bytes (prefix, cost, time)
        assert [guard.complete(f"Q{i}?", **GREEDY).cached for i in (2, 3, 4)] == [True] * 3  # the newest stay
        assert not guard.complete("Q0?", **GREEDY).cached  # the oldest went; answered and stored again
        assert not guard.complete("Q2?", **GREEDY).cached  # which pushed out Q2, the oldest left
        assert len(cache) == 3 and fn.calls == 7


def test_the_size_bound_counts_key_and_value_bytes_and_a_restore_is_new(redis_server, redis_url):
    entries = RedisEntries(redis_url, size_limit=1)
    size = len(entries.entry_key("user:", "a")) + 100  # every entry below: one-letter key, 100 bytes
    entries = RedisEntries(redis_url, size_limit=3 * size)
    client = redis_server.client()

    def kept() -> list[str]:
        return sorted(k.rsplit(":", 1)[1] for k in client.keys(f"{entries.prefix}exact:*"))

    for key in "abc":
        assert entries.set("user:", key, "v" * 100, None)
    assert kept() == ["a", "b", "c"] and int(client.get(f"{entries.prefix}exact-index:bytes")) == 3 * size
    assert entries.set("user:", "a", "w" * 100, None)  # stored again: now the newest
    assert entries.set("user:", "d", "v" * 100, None)
    assert kept() == ["a", "c", "d"] and entries.get("user:", "a") == "w" * 100  # "b" was the oldest
    assert entries.set("user:", "e", "v" * (2 * 100 + size), None)  # takes two entries' room
    assert kept() == ["e"] and len(entries) == 1
    assert not entries.set("user:", "f", "v" * (3 * size), None)  # larger than the whole limit: not kept
    assert kept() == ["e"] and len(entries) == 1
    # What is counted is what is stored: the index matches the entries one for one.
    assert set(client.zrange(f"{entries.prefix}exact-index:order", 0, -1)) == {entries.entry_key("user:", "e")}
    assert client.hvals(f"{entries.prefix}exact-index:size") == [client.get(f"{entries.prefix}exact-index:bytes")]
    entries.clear()
    assert client.keys(f"{entries.prefix}*") == [] and len(entries) == 0


def test_a_corrupted_entry_is_a_miss_with_a_warning(redis_server, redis_url, caplog):
    fn = Answers()
    with ExactCache(redis_url) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        call = guard.prepare("Q?", **GREEDY)
        guard.complete("Q?", **GREEDY)
        key = cache.key(call)
        assert key is not None
        redis_server.client().set(_entries(cache).entry_key("user:", key), b"\xff\x00not json")  # not even UTF-8
        with caplog.at_level(logging.WARNING, logger="tokenguard.cache"):
            reply = guard.complete("Q?", **GREEDY)
        assert not reply.cached and fn.calls == 2 and "corrupted cache entry" in caplog.text
        assert guard.complete("Q?", **GREEDY).cached  # rewritten by the fresh answer


def test_an_unreachable_server_is_a_miss_and_the_call_still_answers(closed_port, caplog):
    fn = Answers()
    with ExactCache(f"redis://127.0.0.1:{closed_port}/0") as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        with caplog.at_level(logging.WARNING, logger="tokenguard.cache"):
            first = guard.complete("Q?", **GREEDY)
            again = guard.complete("Q?", **GREEDY)
        assert not first.cached and not again.cached and fn.calls == 2
        assert "unreadable, treated as a miss" in caplog.text and "could not write" in caplog.text
        assert f"127.0.0.1:{closed_port}" in caplog.text
