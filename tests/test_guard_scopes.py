"""Nested guarded calls: A calls B calls C, and the tokens do not multiply.

Each level is a ``@guard`` function (a real guard around a plain Python function,
counted with gpt-4o's tokenizer) that forwards everything it received plus a task of
its own, all writing one ledger: sync, with asyncio tasks, with a thread pool, and
through the Guard's own methods."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import pytest

import tokenguard as tg
from tokenguard import Guard, Ledger, guard, reply_of, scope
from tokenguard.pipeline import current_frame

TOPICS = ["database migration", "billing invoices", "search ranking", "login tokens", "cache eviction", "deploy"]


def history(n: int = 36) -> list[dict[str, str]]:
    """A root call's context: notes on six topics, about 35 tokens each."""
    return [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"Note {i} on the {TOPICS[i % 6]}: we discussed how the {TOPICS[i % 6]} behaves under "
            "load, what broke last week, and which owner follows up with a fix.",
        }
        for i in range(n)
    ]


def task(level: int, branch: int = 0) -> dict[str, str]:
    """A level's own task, about one topic (so relevance has something to find)."""
    topic = TOPICS[(level + branch) % 6]
    return {"role": "user", "content": f"Level {level} task {branch}: list what the notes say on the {topic}."}


def options(ledger: Ledger, trim: bool) -> dict:
    return {"model": "gpt-4o", "ledger": ledger, **({} if trim else {"scope": None})}


def tree(ledger: Ledger) -> tuple[float, list[dict]]:
    """The one call tree in ``ledger``, checked to be linked: its amplification (input
    tokens of the whole tree over the root's) and its rows."""
    rows = ledger.records()
    roots = [row for row in rows if row["depth"] == 0]
    assert len(roots) == 1
    root = roots[0]
    assert root["parent_id"] is None and root["root_id"] == root["request_id"]
    assert {row["root_id"] for row in rows} == {root["request_id"]}
    by_id = {row["request_id"]: row for row in rows}
    for row in rows:
        if row["depth"]:
            assert by_id[row["parent_id"]]["depth"] == row["depth"] - 1
    assert all(row["error"] is None for row in rows)
    return sum(row["input_tokens"] for row in rows) / root["input_tokens"], rows


def sync_chain(trim: bool, ledger: Ledger | None = None) -> tuple[Ledger, dict]:
    ledger, received = ledger if ledger is not None else Ledger(), {}

    @guard(**options(ledger, trim))
    def level2(messages, max_tokens):
        received[2] = messages
        return "done"

    @guard(**options(ledger, trim))
    def level1(messages, max_tokens):
        received[1] = messages
        reply = reply_of(level2([*messages, task(2)]))
        assert reply.usage.depth == 2
        return "delegated"

    @guard(**options(ledger, trim))
    def level0(messages, max_tokens):
        received[0] = messages
        level1([*messages, task(1)])
        return "planned"

    answer = level0([*history(), task(0)])
    assert answer == "planned" and reply_of(answer).usage.depth == 0
    return ledger, received


def test_without_trimming_a_three_level_chain_costs_about_three_times_its_root():
    ledger, received = sync_chain(trim=False)
    amplification, rows = tree(ledger)
    assert amplification > 2.5
    assert sorted(row["depth"] for row in rows) == [0, 1, 2]
    assert received[2] == [*history(), task(0), task(1), task(2)]  # everything, forwarded twice


def test_default_scopes_keep_a_three_level_chain_under_one_and_a_half():
    ledger, received = sync_chain(trim=True)
    amplification, rows = tree(ledger)
    assert amplification < 1.5
    depth = {row["depth"]: row for row in rows}
    assert sorted(depth) == [0, 1, 2]
    assert depth[2]["parent_id"] == depth[1]["request_id"] and depth[1]["parent_id"] == depth[0]["request_id"]
    assert depth[1]["input_tokens"] <= 0.25 * depth[0]["input_tokens"]
    assert depth[2]["input_tokens"] <= max(0.25 * depth[1]["input_tokens"], 30)
    for level in (0, 1, 2):
        assert task(level) in received[level]  # its own task, intact
        assert received[level][-1] == task(level)
    # What level 1 kept of the notes is about its own topic first.
    kept = [m["content"] for m in received[1] if m["content"].startswith("Note")]
    assert kept and all(TOPICS[1] in note for note in kept[:3])


def test_a_sqlite_ledger_links_the_tree_too(tmp_path):
    ledger, _ = sync_chain(trim=True, ledger=Ledger(tmp_path / "usage.sqlite"))
    amplification, rows = tree(ledger)
    assert amplification < 1.5 and sorted(row["depth"] for row in rows) == [0, 1, 2]
    assert len(Ledger(tmp_path / "usage.sqlite").records(root_id=rows[0]["root_id"])) == 3


def async_chain(trim: bool) -> tuple[Ledger, dict]:
    ledger, received = Ledger(), {}

    @guard(**options(ledger, trim))
    async def level2(messages, branch, max_tokens):
        await asyncio.sleep(0)
        received[2, branch] = messages
        return "done"

    @guard(**options(ledger, trim))
    async def level1(messages, max_tokens):
        received[1, 0] = messages
        await asyncio.gather(*(level2([*messages, task(2, b)], b) for b in range(2)))
        return "delegated"

    @guard(**options(ledger, trim))
    async def level0(messages, max_tokens):
        received[0, 0] = messages
        await asyncio.create_task(level1([*messages, task(1)]))
        return "planned"

    assert asyncio.run(level0([*history(), task(0)])) == "planned"
    return ledger, received


def threaded_chain(trim: bool) -> tuple[Ledger, dict]:
    ledger, received = Ledger(), {}

    @guard(**options(ledger, trim))
    def level2(messages, branch, max_tokens):
        received[2, branch] = messages
        return "done"

    @guard(**options(ledger, trim))
    def level1(messages, max_tokens):
        received[1, 0] = messages
        with ThreadPoolExecutor(2) as pool:
            # copy_context().run carries the call tree into the worker thread.
            futures = [
                pool.submit(contextvars.copy_context().run, level2, [*messages, task(2, b)], b) for b in range(2)
            ]
            assert [f.result() for f in futures] == ["done", "done"]
        return "delegated"

    @guard(**options(ledger, trim))
    def level0(messages, max_tokens):
        received[0, 0] = messages
        level1([*messages, task(1)])
        return "planned"

    assert level0([*history(), task(0)]) == "planned"
    return ledger, received


@pytest.mark.parametrize("chain", [async_chain, threaded_chain])
def test_asyncio_tasks_and_thread_pools_are_children_too(chain):
    # Two children at the last level: 1 + 1 + 2 = about 4x without trimming,
    # 1 + 1/4 + 2/16 with it.
    ledger, received = chain(trim=False)
    amplification, rows = tree(ledger)
    assert amplification > 3.5 and sorted(row["depth"] for row in rows) == [0, 1, 2, 2]
    assert received[2, 1] == [*history(), task(0), task(1), task(2, 1)]

    ledger, received = chain(trim=True)
    amplification, rows = tree(ledger)
    assert amplification < 1.5 and sorted(row["depth"] for row in rows) == [0, 1, 2, 2]
    for (level, branch), messages in received.items():
        assert messages[-1] == task(level, branch)
    # Each branch kept the notes on its own topic, not its sibling's.
    for branch in (0, 1):
        notes = [m["content"] for m in received[2, branch] if m["content"].startswith("Note")]
        assert all(TOPICS[(2 + branch) % 6] in note for note in notes)


def test_a_plain_executor_submit_starts_a_new_tree():
    ledger = Ledger()

    @guard(model="gpt-4o", ledger=ledger)
    def child(messages, max_tokens):
        return "child"

    @guard(model="gpt-4o", ledger=ledger)
    def parent(messages, max_tokens):
        with ThreadPoolExecutor(1) as pool:  # no copy_context: the thread starts empty
            pool.submit(child, messages).result()
        return "parent"

    parent("hello")
    rows = ledger.records()
    assert [row["depth"] for row in rows] == [0, 0] and rows[0]["root_id"] != rows[1]["root_id"]


def test_guard_methods_nest_sync_async_and_streamed():
    ledger = Ledger()
    inner = Guard(lambda messages, max_tokens: "inner", model="gpt-4o", ledger=ledger)

    def outer_sync(messages, max_tokens):  # run by the async API in a worker thread
        assert inner.complete([*messages, task(1)]).usage.depth == 1
        return "outer"

    async def outer_async(messages, max_tokens):
        reply = await inner.acomplete([*messages, task(1)])
        assert reply.usage.depth == 1
        return "outer"

    def outer_stream(messages, max_tokens):  # a generator: nested calls between pieces
        yield "a"
        assert "".join(inner.stream([*messages, task(1)])) == "inner"
        yield "b"

    for fn, run in [
        (outer_sync, lambda g: asyncio.run(g.acomplete([*history(), task(0)]))),
        (outer_sync, lambda g: g.complete([*history(), task(0)])),
        (outer_async, lambda g: asyncio.run(g.acomplete([*history(), task(0)]))),
        (outer_async, lambda g: g.complete([*history(), task(0)])),
        (outer_stream, lambda g: g.complete([*history(), task(0)])),
    ]:
        outer = Guard(fn, model="gpt-4o", ledger=ledger)
        reply = run(outer)
        rows = ledger.records(root_id=reply.request_id)
        assert [(row["depth"], row["parent_id"]) for row in rows] == [(1, reply.request_id), (0, None)], fn
        assert rows[0]["input_tokens"] <= 0.25 * rows[1]["input_tokens"]


def test_between_pieces_of_a_stream_the_caller_is_not_inside_the_call():
    seen = []

    @guard(model="gpt-4o")
    def pieces(messages, max_tokens):
        seen.append(current_frame().depth)
        yield "a"
        seen.append(current_frame().depth)
        yield "b"

    async def apieces(messages, max_tokens):
        seen.append(current_frame().depth)
        yield "a"
        yield "b"

    for piece in pieces("hi"):
        assert current_frame() is None, piece
    assert seen == [0, 0]

    async def read():
        async for _ in Guard(apieces, model="gpt-4o").astream("hi"):
            assert current_frame() is None

    asyncio.run(read())
    assert seen == [0, 0, 0]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_scope_a_guarded_generator_holds_across_a_yield_is_still_its_scope(kind):
    ledger = Ledger()
    inner = Guard(lambda messages, max_tokens: "inner", model="gpt-4o", ledger=ledger)

    @guard(model="gpt-4o", ledger=ledger)
    def pieces(messages, max_tokens):
        with scope("lookup", max_input_tokens=5_000):
            yield "a "
            inner.complete("asked after the yield, inside the scope")
            yield "b"

    @guard(model="gpt-4o", ledger=ledger)
    async def apieces(messages, max_tokens):
        async with scope("lookup", max_input_tokens=5_000):
            yield "a "
            await inner.acomplete("asked after the yield, inside the scope")
            yield "b"

    async def read() -> str:
        return "".join([piece async for piece in apieces("top")])

    text = "".join(pieces("top")) if kind == "sync" else asyncio.run(read())
    assert text == "a b" and current_frame() is None
    child, parent = ledger.records()
    assert (child["scope"], child["depth"], child["parent_id"]) == ("lookup", 1, parent["request_id"])
    assert parent["stop_reason"] == "stop"


def test_an_error_leaves_every_row_and_no_frame_behind():
    ledger = Ledger()

    @guard(model="gpt-4o", ledger=ledger)
    def failing(messages, max_tokens):
        raise RuntimeError("child broke")

    @guard(model="gpt-4o", ledger=ledger)
    def parent(messages, max_tokens):
        return failing([*messages, task(1)])

    with pytest.raises(RuntimeError, match="child broke"):
        parent([*history(), task(0)])
    assert current_frame() is None
    child, root = ledger.records()
    assert child["depth"] == 1 and child["parent_id"] == root["request_id"] and child["stop_reason"] == "error"
    assert root["depth"] == 0 and root["stop_reason"] == "error"

    Guard(lambda messages: "ok", model="gpt-4o", ledger=ledger).complete("a fresh call")  # a root again
    assert ledger.records()[-1]["depth"] == 0 and current_frame() is None


def test_a_scope_sets_the_share_its_calls_may_forward():
    ledger = Ledger()

    @guard(model="gpt-4o", ledger=ledger)
    def child(messages, max_tokens):
        return "child"

    @guard(model="gpt-4o", ledger=ledger)
    def parent(messages, max_tokens):
        with tg.scope("wide", share=1.0):
            child([*messages, task(1)])  # may forward all of it
        with tg.scope("none", share=0.0):
            child([*messages, task(2)])  # its own task alone
        return "parent"

    parent([*history(), task(0)])
    wide, none, root = ledger.records()
    assert (wide["scope"], none["scope"], root["scope"]) == ("wide", "none", None)
    assert 0.9 * root["input_tokens"] < wide["input_tokens"] <= root["input_tokens"]
    assert none["input_tokens"] == tg.count_tokens([task(2)], model="gpt-4o")


def test_a_nested_call_s_tool_definitions_count_against_its_scope():
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "Looks something up in the company knowledge base and returns it " * 6,
    }} for i in range(5)]
    got = []
    child = tg.Guard(lambda messages, max_tokens, **kw: got.append(messages) or "c", model="gpt-4o")

    def plan(messages, max_tokens):
        child.complete([*messages, {"role": "user", "content": "Look up note 3."}], tools=tools)
        return "p"

    parent = tg.Guard(plan, model="gpt-4o")
    notes = [{"role": "user", "content": f"Note {i}: " + "details " * 20} for i in range(15)]
    with tg.scope("research", max_input_tokens=450):
        parent.complete([*notes, {"role": "user", "content": "Plan."}])
    assert tg.count_tokens(got[-1], model="gpt-4o", tools=tools) <= 450  # was 508: the tools were not counted


def test_a_chat_in_a_scope_fits_its_history_into_the_scope_s_limit():
    # The history is the guard's to fit, not the caller's input to refuse: once it
    # grew past the limit, every later turn of the session was refused.
    guard = Guard(lambda messages, max_tokens: "A fine answer that is a bit long. " * 3, model="gpt-4o", stop=None)
    for i in range(20):
        guard.chat(f"Question {i}: tell me about item {i}.", session="s")
    with scope("support", max_input_tokens=300):
        reply = guard.chat("One more short question?", session="s")
        assert reply.usage.input_tokens <= 300 and reply.usage.context_saved_tokens > 0
        with pytest.raises(tg.InputTooLong, match="new turn takes"):
            guard.chat("word " * 400, session="s")  # the turn alone is over the limit
