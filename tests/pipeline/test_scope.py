"""Step 2, scope: explicit ``tokenguard.scope(...)`` frames, and what a nested call
keeps of what it forwards (own messages whole, forwarded ones by relevance, tool calls
with their results), through real guards around plain functions."""

from __future__ import annotations

import asyncio

import pytest

import tokenguard as tg
from tokenguard import ConfigError, Guard, InputTooLong, Ledger, TokenGuardError, get_tokenizer, guard
from tokenguard.pipeline import DEFAULT_SHARE, current_frame

TOK = get_tokenizer("gpt-4o")


def notes(n: int = 24) -> list[dict[str, str]]:
    topics = ["kafka consumer lag", "postgres vacuum", "redis eviction", "nginx timeouts"]
    return [
        {"role": "user", "content": f"Note {i}: the {topics[i % 4]} needs attention before the release, says team {i}."}
        for i in range(n)
    ]


def nested(ledger: Ledger, child_messages, **child_options):
    """A root call on ``notes()`` whose function calls a child with
    ``child_messages(messages)``; the messages the child's function was handed."""
    got = {}

    @guard(model="gpt-4o", ledger=ledger, **child_options)
    def child(messages, max_tokens):
        got["child"] = messages
        return "child"

    @guard(model="gpt-4o", ledger=ledger)
    def parent(messages, max_tokens):
        child(child_messages(messages))
        return "parent"

    parent(notes())
    return got["child"]


def test_a_scope_names_its_calls_and_nests():
    ledger = Ledger()
    ask = Guard(lambda messages: "ok", model="gpt-4o", ledger=ledger)
    assert current_frame() is None
    with tg.scope("outer", max_input_tokens=1_000) as outer:
        assert (outer.name, outer.max_input_tokens, outer.share, outer.depth) == ("outer", 1_000, DEFAULT_SHARE, -1)
        ask.complete("one")
        with tg.scope("inner", max_input_tokens=5_000, share=0.5) as inner:
            assert current_frame() is inner and inner.outer is outer
            assert inner.max_input_tokens == 1_000  # an inner scope narrows, never widens
            ask.complete("two")
        assert current_frame() is outer
        ask.complete("three")
    assert current_frame() is None
    ask.complete("four")
    rows = ledger.records()
    assert [row["scope"] for row in rows] == ["outer", "inner", "outer", None]
    assert [row["depth"] for row in rows] == [0, 0, 0, 0]  # scopes name calls; only calls nest
    assert ledger.records(scope="inner")[0]["input_tokens"] == TOK.count_messages([{"role": "user", "content": "two"}])


def test_async_with_scope_reaches_tasks_and_nested_calls():
    ledger = Ledger()

    @guard(model="gpt-4o", ledger=ledger)
    async def child(messages, max_tokens):
        return "child"

    @guard(model="gpt-4o", ledger=ledger)
    async def parent(messages, max_tokens):
        await asyncio.gather(child([*messages, {"role": "user", "content": "Which postgres vacuum notes?"}]))
        return "parent"

    async def main():
        async with tg.scope("research", max_input_tokens=1_000) as frame:
            assert current_frame() is frame
            await parent(notes())
        assert current_frame() is None

    asyncio.run(main())
    child_row, parent_row = ledger.records()
    assert child_row["scope"] == parent_row["scope"] == "research"
    assert child_row["depth"] == 1 and child_row["parent_id"] == parent_row["request_id"]
    assert parent_row["input_tokens"] <= 1_000 and child_row["input_tokens"] <= 0.25 * parent_row["input_tokens"]


def test_a_scope_s_max_input_tokens_bounds_a_nested_call():
    ledger = Ledger()
    own = {"role": "user", "content": "Summarise the redis eviction notes."}
    got = {}

    @guard(model="gpt-4o", ledger=ledger)
    def child(messages, max_tokens):
        got["child"] = messages
        return "child"

    @guard(model="gpt-4o", ledger=ledger)
    def parent(messages, max_tokens):
        with tg.scope("tight", max_input_tokens=60):
            child([*messages, own])
        return "parent"

    parent(notes())
    child_row = ledger.records(depth=1)[0]
    assert child_row["input_tokens"] <= 60 and child_row["scope"] == "tight"
    assert got["child"][-1] == own
    assert all("redis eviction" in m["content"] for m in got["child"])  # the most relevant note(s)


def test_a_root_call_in_a_scope_is_refused_not_trimmed():
    ledger = Ledger()
    ask = Guard(lambda messages: "ok", model="gpt-4o", ledger=ledger)
    with tg.scope("tight", max_input_tokens=50), pytest.raises(InputTooLong, match="scope 'tight'"):
        ask.complete(notes())
    assert ledger.records()[0]["stop_reason"] == "input_too_long"
    assert ask.complete(notes()).usage.input_tokens == TOK.count_messages(notes())  # outside: untouched


def test_own_messages_over_the_scope_limit_raise_input_too_long():
    ledger = Ledger()
    own = {"role": "user", "content": "Please review this very long request. " * 20}

    @guard(model="gpt-4o", ledger=ledger)
    def child(messages, max_tokens):
        raise AssertionError("a refused call never reaches its function")

    @guard(model="gpt-4o", ledger=ledger)
    def parent(messages, max_tokens):
        with tg.scope("small", max_input_tokens=40):
            child([*messages, own])
        return "parent"

    with pytest.raises(InputTooLong, match="scope 'small'") as info:
        parent(notes())
    assert isinstance(info.value, TokenGuardError) and info.value.limit == 40
    child_row, parent_row = ledger.records()
    assert child_row["stop_reason"] == "input_too_long" and child_row["input_tokens"] == 0
    assert child_row["depth"] == 1 and child_row["parent_id"] == parent_row["request_id"]
    assert parent_row["stop_reason"] == "error" and current_frame() is None


def test_own_messages_over_the_share_are_sent_alone_not_refused():
    # The share bounds forwarded context only: new material (a fetched document) is
    # never refused for being larger than a quarter of the parent's input.
    document = {"role": "user", "content": "Fetched page: " + "postgres vacuum details and numbers. " * 200}
    got = nested(Ledger(), lambda messages: [*messages, document])
    assert got == [document]


def test_forwarded_messages_are_recognised_by_content_not_identity():
    def child_messages(messages):
        copied = [dict(m) for m in messages]  # new dicts, same messages: still forwarded
        changed = {"role": "user", "content": messages[0]["content"] + " (edited)"}  # new content: own
        as_assistant = {"role": "assistant", "content": messages[1]["content"]}  # new role: own
        return [*copied, changed, as_assistant, {"role": "user", "content": "What about nginx timeouts?"}]

    got = nested(Ledger(), child_messages)
    contents = [m["content"] for m in got]
    assert notes()[0]["content"] + " (edited)" in contents
    assert {"role": "assistant", "content": notes()[1]["content"]} in got
    assert got[-1]["content"] == "What about nginx timeouts?"
    forwarded = [m for m in got if m in notes()]
    assert forwarded and len(forwarded) < len(notes())
    # Ranked by what the own messages say: the edited note is on kafka consumer lag.
    assert all("kafka consumer lag" in m["content"] for m in forwarded)


def test_a_forwarded_tool_call_travels_with_its_results():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup_kafka_consumer_lag", "arguments": "{}"}}
    tools = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "kafka consumer lag is 12 minutes on partition 7"},
    ]
    got = {}

    @guard(model="gpt-4o")
    def child(messages, max_tokens):
        got["child"] = messages
        return "child"

    @guard(model="gpt-4o")
    def parent(messages, max_tokens):
        child([*messages, {"role": "user", "content": "How bad is the kafka consumer lag?"}])
        return "parent"

    parent([*notes(8), *tools, *notes(30)[8:]])
    kept = got["child"]
    call_ids = {c["id"] for m in kept for c in m.get("tool_calls") or ()}
    result_ids = {m["tool_call_id"] for m in kept if m["role"] == "tool"}
    assert call_ids == result_ids == {"c1"}  # relevant, and kept as a pair
    position = kept.index(tools[0])
    assert kept[position + 1] == tools[1]


def test_system_messages_are_kept_and_counts_use_the_backend_s_chat_template():
    smol = get_tokenizer("SmolLM2-135M-Instruct")
    ledger = Ledger()
    got = {}
    system = {"role": "system", "content": "You are the release assistant."}

    @guard(model="smol", tokenizer=smol, ledger=ledger, prices={"smol": (0, 0)})
    def child(messages, max_tokens):
        got["child"] = messages
        return "child"

    @guard(model="smol", tokenizer=smol, ledger=ledger, prices={"smol": (0, 0)})
    def parent(messages, max_tokens):
        child([*messages, {"role": "user", "content": "Anything on postgres vacuum?"}])
        return "parent"

    parent([system, *notes()])
    child_row, parent_row = ledger.records()
    assert got["child"][0] == system
    assert child_row["input_tokens"] == smol.count_messages(got["child"])
    assert child_row["input_tokens"] <= 0.25 * parent_row["input_tokens"]


def test_trimming_can_be_turned_off_while_the_tree_is_still_linked():
    ledger = Ledger()
    got = nested(ledger, lambda messages: [*messages, {"role": "user", "content": "next"}], scope=None)
    assert got[:-1] == notes()
    child_row, parent_row = ledger.records()
    assert child_row["depth"] == 1 and child_row["parent_id"] == parent_row["request_id"]
    assert child_row["root_id"] == parent_row["root_id"] == parent_row["request_id"]


def test_scope_arguments_are_checked():
    for bad in [{"name": ""}, {"name": "x", "max_input_tokens": -1}, {"name": "x", "max_input_tokens": True},
                {"name": "x", "share": 1.5}, {"name": "x", "share": -0.1}, {"name": "x", "share": "half"}]:
        with pytest.raises(ConfigError):
            tg.scope(**bad)


def test_a_scope_left_elsewhere_is_an_error():
    entered = tg.scope("a")
    entered.__enter__()
    try:
        with pytest.raises(TokenGuardError, match="not entered"):
            tg.scope("b").__exit__(None, None, None)
    finally:
        entered.__exit__(None, None, None)
    assert current_frame() is None
