"""SemanticCache on Redis (a real redis-server, tests/conftest.py), real FAISS and, for
meaning, the real all-MiniLM-L6-v2: the disk cache's scenarios (test_semantic.py) run
on a Redis URL, plus what only Redis has: the key layout per partition, tenants by
prefix, a server that is down at construction or goes down later."""

from __future__ import annotations

import logging
import math
import uuid

import numpy as np
import pytest
from test_semantic import (  # the disk cache's scenarios and helpers, run here on Redis
    GREEDY,
    Answers,
    corrupted_entry_is_a_miss,
    expires,
    hashed_words,
    keeps_at_most_max_entries,
    load_minilm,
    lookups_go_on_while_a_group_trains,
    rewordings_hit_and_near_misses_miss,
    shared_between_processes,
)

from tokenguard import Guard
from tokenguard.cache import SemanticCache
from tokenguard.cache.redis_semantic import RedisSemanticEntries
from tokenguard.errors import ConfigError, StoreError

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _entries(cache: SemanticCache) -> RedisSemanticEntries:
    assert isinstance(cache._entries, RedisSemanticEntries)
    return cache._entries


def test_a_redis_url_selects_redis(redis_url):
    with SemanticCache(redis_url, embedder=hashed_words) as cache:
        assert cache.path is None and isinstance(cache._entries, RedisSemanticEntries)
        assert repr(cache) == f"SemanticCache({redis_url.split('?')[0]!r}, threshold=0.8)"


@pytest.mark.slow
def test_rewordings_hit_and_near_misses_miss(redis_url, minilm):
    rewordings_hit_and_near_misses_miss(redis_url, minilm)


def test_an_answer_stored_by_one_process_is_a_hit_in_another(redis_url):
    shared_between_processes(redis_url)


def test_partitions_never_cross(redis_server, redis_url):
    """Each partition's entries are its own key range, and an answer from another
    partition is never served, even when it sits in this partition's group."""
    fn = Answers()
    client = redis_server.client()
    with SemanticCache(redis_url, embedder=hashed_words) as per_user:
        guard = Guard(fn, model="gpt-4o-mini", cache=per_user)
        alice = guard.complete("Where is the Louvre?", user="alice", **GREEDY)
        bob = guard.complete("Where is the Louvre?", user="bob", **GREEDY)
        assert not bob.cached and bob.text != alice.text
        assert guard.complete("where is the louvre", user="alice", **GREEDY).text == alice.text
        assert guard.complete("where is the louvre", user="bob", **GREEDY).text == bob.text
        assert not guard.complete("where is the louvre", **GREEDY).cached  # the anonymous partition
        prefix = _entries(per_user).prefix
        entries = sorted(k for k in client.keys(f"{prefix}semantic:*") if not k.endswith(":ids"))
        assert [k.rsplit(":", 2)[0] for k in entries] == [
            f"{prefix}semantic:user:", f"{prefix}semantic:user:alice", f"{prefix}semantic:user:bob"]

        # Alice's entry planted in Carol's group, as if the index held it: still not hers.
        guard.complete("Something else entirely", user="carol", **GREEDY)
        (carol_ids,) = client.keys(f"{prefix}semantic:user:carol:*:ids")
        (alice_entry,) = (k for k in entries if k.startswith(f"{prefix}semantic:user:alice:"))
        planted = f"{carol_ids.removesuffix(':ids')}:999999"
        client.hset(planted, mapping=client.hgetall(alice_entry))
        client.zadd(carol_ids, {"999999": 999999})
        carol = guard.complete("where is the louvre", user="carol", **GREEDY)
        assert not carol.cached and carol.text != alice.text
    with SemanticCache(redis_url, embedder=hashed_words, scope="global") as everyone:
        guard = Guard(fn, model="gpt-4o-mini", cache=everyone)
        guard.complete("Where is the Louvre?", user="alice", **GREEDY)
        assert guard.complete("where is the louvre", user="bob", **GREEDY).cached


def test_tenants_by_prefix_never_share_an_entry(redis_server):
    fn = Answers()
    with SemanticCache(redis_server.url(prefix=f"acme{uuid.uuid4().hex[:6]}:"), embedder=hashed_words) as acme, \
            SemanticCache(redis_server.url(prefix=f"umbrella{uuid.uuid4().hex[:6]}:"),
                          embedder=hashed_words) as umbrella:
        Guard(fn, model="gpt-4o-mini", cache=acme).complete("Where is the Louvre?", **GREEDY)
        assert not Guard(fn, model="gpt-4o-mini", cache=umbrella).complete("where is the louvre", **GREEDY).cached
        assert (len(acme), len(umbrella)) == (1, 1)
        acme.clear()
        assert (len(acme), len(umbrella)) == (0, 1)
        assert redis_server.client().keys(f"{_entries(acme).prefix}*") == [f"{_entries(acme).prefix}semantic-index:seq"]
        assert not Guard(fn, model="gpt-4o-mini", cache=acme).complete("where is the louvre", **GREEDY).cached
        assert Guard(fn, model="gpt-4o-mini", cache=umbrella).complete("Where is the Louvre", **GREEDY).cached


def test_entries_expire_by_redis_ttl(redis_server, redis_url):
    with SemanticCache(redis_url, embedder=hashed_words, ttl=60) as lasting:
        Guard(Answers(), model="gpt-4o-mini", cache=lasting).complete("Where is the Louvre?", **GREEDY)
        (entry,) = (k for k in redis_server.client().keys(f"{_entries(lasting).prefix}semantic:*")
                    if not k.endswith(":ids"))
        assert 55_000 < redis_server.client().pttl(entry) <= 60_000
    expires(redis_server.url(prefix=f"t{uuid.uuid4().hex[:12]}:"), 0.2)


def test_a_ttl_that_is_no_finite_number_of_seconds_is_refused_on_disk_and_in_redis(redis_url, tmp_path):
    for path in (None, tmp_path, redis_url):
        for ttl in (math.inf, math.nan, 0):
            with pytest.raises(ConfigError, match="ttl"):
                SemanticCache(path, embedder=hashed_words, ttl=ttl)
    fn = Answers()
    with SemanticCache(redis_url, embedder=hashed_words, ttl=1e300) as lasting:  # as good as never
        guard = Guard(fn, model="gpt-4o-mini", cache=lasting)
        guard.complete("Where is the Louvre?", **GREEDY)
        assert guard.complete("Where is the Louvre?", **GREEDY).cached and fn.calls == 1


def test_it_keeps_at_most_max_entries_oldest_first(redis_server, redis_url):
    keeps_at_most_max_entries(redis_url)
    client = redis_server.client()
    prefix = redis_url.split("prefix=")[1].replace("%3A", ":")
    entries = [k for k in client.keys(f"{prefix}semantic:*") if not k.endswith(":ids")]
    (ids,) = client.keys(f"{prefix}semantic:*:ids")
    # What is indexed is what is stored: five entries, five ids in their group, in the order.
    assert len(entries) == client.zcard(ids) == client.zcard(f"{prefix}semantic-index:order") == 5


def test_a_corrupted_entry_is_a_miss_with_a_warning(redis_server, redis_url, caplog):
    client = redis_server.client()
    with SemanticCache(redis_url, embedder=hashed_words) as cache:
        prefix = _entries(cache).prefix

        def corrupt() -> None:
            for key in client.keys(f"{prefix}semantic:*"):
                if not key.endswith(":ids"):
                    client.hset(key, "a", b"\xff\x00not json")  # not even UTF-8

        corrupted_entry_is_a_miss(cache, corrupt, caplog)


def test_an_unreadable_vector_is_skipped_with_a_warning(redis_server, redis_url, caplog):
    """A vector of the wrong size, or an entry key that is not a hash, does not stop the
    group loading in a process that reads it: those entries are skipped, the rest hit."""
    fn = Answers()
    with SemanticCache(redis_url, embedder=hashed_words) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        for question in ("Where is the Louvre?", "Where is the Prado?", "Where is the Uffizi?"):
            guard.complete(question, **GREEDY)
    client = redis_server.client()
    louvre, prado, _ = sorted((k for k in client.keys(f"{_entries(cache).prefix}semantic:*")
                               if not k.endswith(":ids")), key=lambda k: int(k.rsplit(":", 1)[1]))
    client.hset(louvre, "v", np.zeros(3, dtype=np.float32).tobytes())
    client.delete(prado)
    client.set(prado, "not a hash")
    with SemanticCache(redis_url, embedder=hashed_words) as reopened, \
            caplog.at_level(logging.WARNING, logger="tokenguard.cache"):
        guard = Guard(fn, model="gpt-4o-mini", cache=reopened)
        assert guard.complete("where is the uffizi", **GREEDY).cached
        assert "skipped 2 entries unreadable or of another vector size" in caplog.text
        assert not guard.complete("where is the louvre", **GREEDY).cached


def test_lookups_of_other_groups_go_on_while_a_group_trains(redis_url, monkeypatch):
    lookups_go_on_while_a_group_trains(redis_url, monkeypatch)


def test_an_unreachable_server_is_a_store_error_at_construction(closed_port):
    with pytest.raises(StoreError, match=f"cannot reach the Redis server at redis://127.0.0.1:{closed_port}/0"):
        SemanticCache(f"redis://127.0.0.1:{closed_port}/0?prefix=x:", embedder=hashed_words)


def test_a_server_that_goes_down_later_is_a_miss_and_the_call_still_answers(spare_redis, caplog):
    fn = Answers()
    with SemanticCache(spare_redis.url(), embedder=hashed_words) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        guard.complete("Where is the Louvre?", **GREEDY)
        spare_redis.stop()
        with caplog.at_level(logging.WARNING, logger="tokenguard.cache"):
            reply = guard.complete("where is the louvre", **GREEDY)
        assert not reply.cached and fn.calls == 2
        assert "unreadable, treated as a miss" in caplog.text and "could not write" in caplog.text
        assert f"127.0.0.1:{spare_redis.port}" in caplog.text
