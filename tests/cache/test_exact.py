"""ExactCache through the Guard: real diskcache files, real tokenizers and prices,
plain-function backends that count how often they run."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenguard as tg
from tokenguard import Guard, Ledger
from tokenguard.cache import ExactCache, SemanticCache
from tokenguard.errors import StoreError

GREEDY = {"temperature": 0}


class Answers:
    """A backend function that answers with a numbered reply and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages, *, max_tokens, **params):
        self.calls += 1
        return f"Answer number {self.calls} to: {messages[-1]['content']}"


@pytest.fixture
def cache(tmp_path):
    with ExactCache(tmp_path / "answers") as c:
        yield c


def test_a_repeated_question_costs_nothing_and_saves_what_it_cost(cache):
    fn, ledger = Answers(), Ledger()
    guard = Guard(fn, model="gpt-4o-mini", cache=cache, ledger=ledger)
    first = guard.complete("What is the capital of France?", **GREEDY)
    again = guard.complete("What is the capital of France?", **GREEDY)
    assert fn.calls == 1
    assert again.text == first.text and again.cached and not first.cached
    assert again.stop_reason == "cache"
    assert (again.usage.input_tokens, again.usage.output_tokens, again.usage.cost_usd) == (0, 0, 0.0)
    assert again.usage.saved_tokens == first.usage.total_tokens > 0
    assert again.usage.saved_usd == pytest.approx(first.usage.cost_usd) and first.usage.cost_usd > 0
    rows = ledger.records()
    assert [(r["cached"], r["stop_reason"], r["input_tokens"]) for r in rows] == [
        (0, "stop", first.usage.input_tokens), (1, "cache", 0)]
    assert rows[1]["saved_tokens"] == first.usage.total_tokens
    assert rows[1]["saved_usd"] == pytest.approx(first.usage.cost_usd)
    assert ledger.totals()["saved_usd"] == pytest.approx(first.usage.cost_usd)


@pytest.mark.parametrize("change", [
    {"messages": [{"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]},
    {"tool_choice": "none"},
    {"response_format": {"type": "json_object"}},
    {"max_tokens": 17},
    {"top_p": 0.5},
])
def test_anything_that_changes_the_answer_is_a_miss(cache, change):
    fn = Answers()
    guard = Guard(fn, model="gpt-4o-mini", cache=cache)
    guard.complete("What is the capital of France?", **GREEDY)
    request = dict(change)
    messages = request.pop("messages", "What is the capital of France?")
    assert not guard.complete(messages, **GREEDY, **request).cached
    assert guard.complete(messages, **GREEDY, **request).cached  # and that request is cached in turn
    assert fn.calls == 2


def test_another_function_or_argument_or_model_never_shares_an_answer(cache):
    fn, other = Answers(), Answers()
    Guard(fn, model="gpt-4o-mini", cache=cache).complete("Q?", **GREEDY)
    assert not Guard(other, model="gpt-4o-mini", cache=cache).complete("Q?", **GREEDY).cached
    assert not Guard(fn, model="gpt-4o", cache=cache).complete("Q?", **GREEDY).cached

    @tg.guard(model="gpt-4o-mini", cache=cache)
    def ask(messages, language, *, max_tokens, temperature) -> str:
        ask.calls = getattr(ask, "calls", 0) + 1
        return f"{language}: {messages[-1]['content']}"

    assert ask("Q?", "en", temperature=0) == "en: Q?"
    hit = ask("Q?", "en", temperature=0)
    assert hit == "en: Q?" and isinstance(hit, str) and tg.reply_of(hit).cached  # a hit keeps the return type
    assert ask("Q?", "fr", temperature=0) == "fr: Q?"
    assert ask.calls == 2

    # One factory's functions differ by what their closure holds; two lambdas by their code.
    def persona(name):
        return tg.guard(lambda messages, max_tokens, temperature: f"{name} says hi", model="gpt-4o-mini", cache=cache)

    pirate, robot = persona("pirate"), persona("robot")
    assert pirate("Q?", temperature=0) == "pirate says hi" and tg.reply_of(pirate("Q?", temperature=0)).cached
    assert robot("Q?", temperature=0) == "robot says hi"
    first = tg.guard(lambda messages, max_tokens, temperature: "A", model="gpt-4o-mini", cache=cache)
    second = tg.guard(lambda messages, max_tokens, temperature: "B", model="gpt-4o-mini", cache=cache)
    assert (first("Q?", temperature=0), second("Q?", temperature=0)) == ("A", "B")


SYSTEM_PROMPT = "Answer in English."


def test_arrays_and_the_constants_a_function_reads_are_part_of_its_identity(cache):
    global SYSTEM_PROMPT

    @tg.guard(model="gpt-4o-mini", cache=cache)
    def total(messages, data, *, max_tokens, temperature) -> str:
        return f"{SYSTEM_PROMPT} sum={int(data.sum())}"

    zeros, five = np.zeros(2000), np.zeros(2000)
    five[1000] = 5  # the same repr as zeros: numpy elides the middle of a long array
    assert (total("sum?", zeros, temperature=0), total("sum?", five, temperature=0)) == (
        "Answer in English. sum=0", "Answer in English. sum=5")
    assert tg.reply_of(total("sum?", five, temperature=0.0)).cached  # 0 and 0.0 ask alike
    try:
        SYSTEM_PROMPT = "Answer in French."  # an edited prompt is a new function
        assert total("sum?", zeros, temperature=0) == "Answer in French. sum=0"
    finally:
        SYSTEM_PROMPT = "Answer in English."
    assert tg.reply_of(total("sum?", zeros, temperature=0)).cached


def test_only_deterministic_requests_are_cached_unless_asked(tmp_path):
    fn = Answers()
    with ExactCache(tmp_path / "c") as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        guard.complete("Q?")  # a function backend may sample: no temperature, no caching
        guard.complete("Q?", temperature=0.7)
        assert not guard.complete("Q?").cached and len(cache) == 0
    with ExactCache(tmp_path / "s", cache_sampled=True) as sampled:
        guard = Guard(fn, model="gpt-4o-mini", cache=sampled)
        guard.complete("Q?", temperature=0.7)
        assert guard.complete("Q?", temperature=0.7).cached


def test_scopes_partition_users_and_sessions(tmp_path):
    fn = Answers()
    with ExactCache(tmp_path / "u") as per_user, ExactCache(tmp_path / "s", scope="session") as per_session, \
            ExactCache(tmp_path / "g", scope="global") as shared:
        by_user = Guard(fn, model="gpt-4o-mini", cache=per_user)
        by_user.complete("Q?", user="alice", **GREEDY)
        assert not by_user.complete("Q?", user="bob", **GREEDY).cached
        assert by_user.complete("Q?", user="alice", **GREEDY).cached
        by_session = Guard(fn, model="gpt-4o-mini", cache=per_session)
        by_session.complete("Q?", session="s1", **GREEDY)
        assert not by_session.complete("Q?", session="s2", **GREEDY).cached
        assert by_session.complete("Q?", session="s1", **GREEDY).cached
        by_session.complete("Q?", **GREEDY)
        assert not by_session.complete("Q?", **GREEDY).cached  # no session: not cached at all
        everyone = Guard(fn, model="gpt-4o-mini", cache=shared)
        everyone.complete("Q?", user="alice", **GREEDY)
        assert everyone.complete("Q?", user="bob", **GREEDY).cached
    with pytest.raises(tg.ConfigError, match="scope"):
        ExactCache(scope="team")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(st.sampled_from(["alice", "bob", None]), st.sampled_from(["s1", "s2", None]),
                                st.sampled_from(["Q1", "Q2"])), min_size=1, max_size=12),
       scope=st.sampled_from(["user", "session", "global"]), kind=st.sampled_from(["exact", "semantic"]))
def test_no_entry_crosses_its_partition(calls, scope, kind):
    """Whatever the order of calls, a hit only ever returns an answer first given in the
    same partition: each answer names the user and session that produced it. The
    semantic cache embeds with a constant vector here, so every question is every
    other's nearest neighbour: only the partition keeps them apart."""
    caller = {"tag": ""}  # who is asking, known to the function but not part of the request

    def answer(messages, *, max_tokens, **params):
        return f"{caller['tag']}|{messages[-1]['content']}"

    def constant(texts):
        return np.ones((len(texts), 8), dtype=np.float32)

    make = ExactCache if kind == "exact" else functools.partial(SemanticCache, embedder=constant, same_details=False)
    with make(scope=scope) as cache:
        guard = Guard(answer, model="gpt-4o-mini", cache=cache)
        for user, session, question in calls:
            caller["tag"] = f"{user}/{session}"
            reply = guard.complete(question, user=user, session=session, **GREEDY)
            origin_user, origin_session = reply.text.split("|")[0].split("/")
            if scope == "user":
                assert origin_user == str(user)
            elif scope == "session":
                assert not reply.cached or origin_session == str(session)


def test_a_stream_replays_a_cached_answer(cache):
    guard = Guard(Answers(), model="gpt-4o-mini", cache=cache)
    first = guard.complete("Tell me a story.", **GREEDY)
    stream = guard.stream("Tell me a story.", **GREEDY)
    assert "".join(stream) == first.text
    assert stream.reply is not None and stream.reply.cached


def test_async_calls_hit_too(cache):
    fn = Answers()
    guard = Guard(fn, model="gpt-4o-mini", cache=cache)

    async def main():
        first = await guard.acomplete("Q?", **GREEDY)
        return first, await guard.acomplete("Q?", **GREEDY)

    first, again = asyncio.run(main())
    assert again.cached and again.text == first.text and fn.calls == 1


def test_entries_survive_a_restart_and_are_shared_between_processes(tmp_path):
    path = tmp_path / "shared"
    function = 'def answers(messages, *, max_tokens, temperature):\n    return "written by the other process"\n'
    script = textwrap.dedent(f"""
        from tokenguard import Guard
        from tokenguard.cache import ExactCache, SemanticCache
        with ExactCache({str(path)!r}) as cache:
            reply = Guard(answers, model="gpt-4o-mini", cache=cache).complete("Q?", temperature=0)
            print(reply.cached)
    """)
    out = subprocess.run([sys.executable, "-c", function + script], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False"
    # This process, the same function (its name, module and code): the key is the same,
    # so the other process's entry answers here.
    namespace: dict = {"__name__": "__main__"}
    exec(function, namespace)
    with ExactCache(path) as reopened:
        reply = Guard(namespace["answers"], model="gpt-4o-mini", cache=reopened).complete("Q?", temperature=0)
    assert reply.cached and reply.text == "written by the other process"


def test_a_corrupted_entry_is_a_miss_with_a_warning(cache, caplog):
    fn = Answers()
    guard = Guard(fn, model="gpt-4o-mini", cache=cache)
    call = guard.prepare("Q?", **GREEDY)
    guard.complete("Q?", **GREEDY)
    key = cache.key(call)
    assert key is not None
    cache._store.set(key, b"\x00not json")
    with caplog.at_level(logging.WARNING, logger="tokenguard.cache"):
        reply = guard.complete("Q?", **GREEDY)
    assert not reply.cached and fn.calls == 2 and "corrupted cache entry" in caplog.text
    assert guard.complete("Q?", **GREEDY).cached  # rewritten by the fresh answer
    # An entry that parses but would put text in the ledger's numbers is as corrupted.
    entry = json.loads(cache._store.get(key))
    for tampered in ({"cost_usd": "free"}, {"output_tokens": -5}, {"input_tokens": 1.5}):
        cache._store.set(key, json.dumps({**entry, **tampered}).encode())
        assert not guard.complete("Q?", **GREEDY).cached
    assert guard.ledger.report().totals["calls"] == len(guard.ledger.records())  # the ledger still reads


def test_a_cache_that_cannot_be_opened_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the cache"):
        ExactCache(blocker)
    with pytest.raises(tg.ConfigError, match="ttl"):
        ExactCache(ttl=0)


def test_failed_calls_are_not_stored(cache):
    def failing(messages, *, max_tokens, temperature):
        raise RuntimeError("upstream down")

    guard = Guard(failing, model="gpt-4o-mini", cache=cache)
    with pytest.raises(RuntimeError, match="upstream down"):
        guard.complete("Q?", **GREEDY)
    assert len(cache) == 0


def test_a_private_cache_removes_its_directory(tmp_path):
    cache = ExactCache()
    path = cache.path
    Guard(Answers(), model="gpt-4o-mini", cache=cache).complete("Q?", **GREEDY)
    assert path.exists() and len(cache) == 1
    cache.close()
    assert not path.exists()


def test_caches_are_looked_up_in_order(tmp_path):
    fn = Answers()
    with ExactCache(tmp_path / "a") as first, ExactCache(tmp_path / "b", scope="global") as second:
        guard = Guard(fn, model="gpt-4o-mini", cache=[first, second])
        guard.complete("Q?", user="alice", **GREEDY)  # stored in both
        assert len(first) == len(second) == 1
        assert guard.complete("Q?", user="bob", **GREEDY).cached  # the per-user cache misses, the global hits
        assert fn.calls == 1


CALLS_SO_FAR = 0


def test_an_answer_is_stored_under_the_key_it_was_looked_up_by(cache):
    # The function counts its calls in a constant global: the key taken after the call
    # (with the new count) was hit by the next call's lookup, and served the old answer.
    @tg.guard(model="gpt-4o-mini", cache=cache)
    def counts(messages, *, max_tokens, temperature) -> str:
        global CALLS_SO_FAR
        CALLS_SO_FAR += 1
        return f"call {CALLS_SO_FAR}"

    assert [counts("Q?", temperature=0) for _ in range(3)] == ["call 1", "call 2", "call 3"]


def test_pydantic_arguments_are_keyed_by_their_data(cache):
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        language: str

    @tg.guard(model="gpt-4o-mini", cache=cache)
    def greet(messages, person, *, max_tokens, temperature) -> str:
        return f"Hello {person.name} ({person.language})"

    alice, bob = Person(name="Alice", language="en"), Person(name="Bob", language="en")
    assert greet("Hi", alice, temperature=0) == "Hello Alice (en)"
    assert greet("Hi", bob, temperature=0) == "Hello Bob (en)"  # was Alice's answer: both keyed by the schema
    assert tg.reply_of(greet("Hi", Person(name="Bob", language="en"), temperature=0)).cached


def test_parameters_with_keys_of_several_types_are_cached(cache):
    fn = Answers()
    guard = Guard(fn, model="gpt-4o-mini", cache=cache)
    guard.complete("Q?", logit_bias={50256: -100, "1734": 5}, **GREEDY)  # the sort of mixed keys raised
    assert guard.complete("Q?", logit_bias={"50256": -100, 1734: 5}, **GREEDY).cached  # as JSON sends them
    assert not guard.complete("Q?", logit_bias={50256: -100, "1734": 6}, **GREEDY).cached


@pytest.mark.parametrize("answer", [
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
                  "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        "finish_reason": "length"}]},
])
def test_empty_answers_and_tool_calls_are_not_stored(cache, answer):
    guard = Guard(lambda messages, max_tokens, temperature: answer, model="gpt-4o-mini", cache=cache)
    guard.complete("Q?", **GREEDY)
    assert not guard.complete("Q?", **GREEDY).cached and len(cache) == 0


def test_a_streamed_tool_call_without_a_finish_reason_ends_as_tool_calls(cache):
    def calls(messages, *, max_tokens, temperature):
        yield {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}}]}

    reply = Guard(calls, model="gpt-4o-mini", cache=cache).complete("Q?", **GREEDY)
    assert reply.stop_reason == "tool_calls" and reply.tool_calls and len(cache) == 0


def test_text_and_ids_that_are_no_utf8_do_not_fail_a_call(cache):
    guard = Guard(lambda messages, max_tokens, temperature: "broken \ud800 text", model="gpt-4o-mini", cache=cache)
    assert guard.complete("Q?", **GREEDY).text == "broken \ud800 text"
    hit = guard.complete("Q?", **GREEDY)
    assert hit.cached and hit.text == "broken \ud800 text"
    with pytest.raises(tg.InvalidRequest, match="unpaired UTF-16 surrogate"):
        guard.complete("Q?", user="\udc80", **GREEDY)  # refused before the backend runs: no store takes it
    assert len(cache) == 1


STYLE = "formal"


def test_constants_read_in_a_comprehension_and_large_closures_are_part_of_the_identity(cache):
    global STYLE

    @tg.guard(model="gpt-4o-mini", cache=cache)
    def styled(messages, *, max_tokens, temperature) -> str:
        return " ".join(f"[{STYLE}] {m['content']}" for m in messages)  # STYLE is read by the generator's code

    assert styled("hello", temperature=0) == "[formal] hello"
    try:
        STYLE = "casual"
        assert styled("hello", temperature=0) == "[casual] hello"
    finally:
        STYLE = "formal"

    def few_shot(prefix):  # one factory, two sets of 100 examples
        examples = [f"{prefix} example {i}" for i in range(100)]
        return tg.guard(lambda messages, max_tokens, temperature: examples[0], model="gpt-4o-mini", cache=cache)

    a, b = few_shot("A"), few_shot("B")
    assert (a("Q?", temperature=0), b("Q?", temperature=0)) == ("A example 0", "B example 0")
    assert tg.reply_of(few_shot("A")("Q?", temperature=0)).cached  # the same examples: the same function
