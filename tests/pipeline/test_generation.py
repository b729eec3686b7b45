"""Step 6: one generate loop for sync and async streams, with chunk watchers that may
end a stream. The watcher here is written for the test: the test is about the seam a
repetition stopper plugs into, not about any one watcher."""

from __future__ import annotations

import asyncio

from tokenguard import Budget, Guard
from tokenguard.backends import BackendUsage, Chunk
from tokenguard.pipeline import Call, Generation, OutputCap, Stop
from tokenguard.tokens import get_tokenizer

TOK = get_tokenizer("gpt-4o")


class StopAtWord:
    """Ends the stream when ``word`` appears, passing on the text before it."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.started: list[str] = []

    def watch(self, call: Call) -> StopAtWord.Watch:
        self.started.append(call.request_id)
        return StopAtWord.Watch(self.word)

    class Watch:
        def __init__(self, word: str) -> None:
            self.word = word

        def feed(self, piece: str) -> str | Stop:
            if self.word in piece:
                return Stop("stop_word", keep=piece[: piece.index(self.word)])
            return piece


def looping(messages, *, max_tokens):
    looping.closed = False
    try:
        yield "one "
        yield "two "
        yield "three STOP four "
        while True:
            yield "more "
    finally:
        looping.closed = True


async def alooping(messages, *, max_tokens):
    alooping.closed = False
    try:
        yield "one "
        yield "two "
        yield "three STOP four "
        while True:
            yield "more "
    finally:
        alooping.closed = True


def test_a_watcher_ends_a_sync_stream_closes_the_backend_and_names_the_reason():
    budget = Budget(tokens=100_000)
    guard = Guard(looping, model="gpt-4o", budget=budget)
    watcher = StopAtWord("STOP")
    guard.watchers.append(watcher)
    reply = guard.complete("count")
    assert reply.text == "one two three " and reply.stop_reason == "stop_word"
    assert looping.closed
    # The piece the stop word came in was generated whole: all of it is metered.
    assert reply.usage.output_tokens == TOK.count("one two three STOP four ")
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "stop_word" and row["request_id"] == watcher.started[0]
    assert budget.spent()["tokens"] == reply.usage.total_tokens and budget.spent()["reserved_tokens"] == 0


def test_the_same_watcher_ends_an_async_stream():
    guard = Guard(alooping, model="gpt-4o")
    guard.watchers.append(StopAtWord("STOP"))

    async def run():
        stream = guard.astream("count")
        pieces = [piece async for piece in stream]
        return pieces, stream.reply

    pieces, reply = asyncio.run(run())
    assert "".join(pieces) == "one two three " and reply.stop_reason == "stop_word"
    assert alooping.closed


def test_the_output_cap_watches_first_so_later_watchers_see_capped_text():
    guard = Guard(looping, model="gpt-4o", max_output_tokens=2)
    guard.watchers.append(StopAtWord("STOP"))
    reply = guard.complete("count")
    assert reply.stop_reason == "length" and TOK.count(reply.text) == 2


def test_generation_feeds_watchers_and_says_how_the_call_ended():
    call = Guard(lambda messages: "", model="gpt-4o", max_output_tokens=3).prepare("hi")
    generation = Generation([OutputCap().watch(call)])
    kept = TOK.truncate("a b c d e f", 3)
    assert generation.feed(Chunk(text="a b ")) == "a b "
    assert generation.feed(Chunk(text="c d e f")) == kept[len("a b ") :]
    assert generation.stopped
    assert generation.feed(Chunk(text="ignored")) == ""
    generation.feed(Chunk(finish_reason="stop", usage=BackendUsage(5, 3, 0)))
    outcome = generation.outcome()
    assert outcome.text == kept and outcome.stop_reason == "length"
    assert outcome.backend_usage == BackendUsage(5, 3, 0) and outcome.spent and outcome.succeeded


def test_outcome_of_a_failure_and_of_a_cancellation():
    generation = Generation([])
    failed = generation.outcome(ConnectionError("down"))
    assert failed.stop_reason == "error" and not failed.spent and not failed.succeeded
    generation.feed(Chunk(text="partial"))
    cancelled = generation.outcome(asyncio.CancelledError())
    assert cancelled.stop_reason == "cancelled" and cancelled.spent and cancelled.text == "partial"
    assert generation.outcome(cancelled=True).stop_reason == "cancelled"


def _calls(*chunks: list[dict]) -> list[dict] | None:
    """The tool calls a Generation joins from chunks holding these tool-call parts."""
    generation = Generation([])
    for parts in chunks:
        generation.feed(Chunk(calls_tools=True, tool_calls=tuple(parts)))
    return generation.outcome().tool_calls


def _call(id_: str | None, name: str, arguments: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_tool_calls_are_joined_from_the_parts_servers_stream():
    paris, rome = '{"city": "Paris"}', '{"city": "Rome"}'
    # OpenAI: by index, the id and name first, the arguments in pieces, calls interleaved.
    assert _calls([{"index": 0, "id": "a", "type": "function", "function": {"name": "weather", "arguments": ""}}],
                  [{"index": 1, "id": "b", "function": {"name": "weather"}}],
                  [{"index": 0, "function": {"arguments": paris[:5]}}], [{"index": 1, "function": {"arguments": rome}}],
                  [{"index": 0, "function": {"arguments": paris[5:]}}]) == [
        _call("a", "weather", paris), _call("b", "weather", rome)]
    # Servers that repeat the id, type or name in every part: still one call.
    assert _calls([{"index": 0, "id": "a", "type": "function", "function": {"name": "weather", "arguments": ""}}],
                  [{"index": 0, "id": "a", "function": {"name": "weather", "arguments": paris[:5]}}],
                  [{"index": 0, "type": "function", "function": {"name": "weather", "arguments": paris[5:]}}]) == [
        _call("a", "weather", paris)]
    # Servers that number every call 0, or none: a new id begins a call, and the parts
    # after it go on with that call.
    for numbered in ({"index": 0}, {}):
        assert _calls([{**numbered, "id": "a", "function": {"name": "weather", "arguments": ""}}],
                      [{**numbered, "function": {"arguments": paris}}],
                      [{**numbered, "id": "b", "function": {"name": "weather", "arguments": rome[:4]}}],
                      [{**numbered, "function": {"arguments": rome[4:]}}]) == [
            _call("a", "weather", paris), _call("b", "weather", rome)]
    # Whole calls under one index (or none) and no ids: a name on a whole call begins another.
    for numbered in ({"index": 0}, {}):
        assert _calls([{**numbered, "function": {"name": "weather", "arguments": paris}}],
                      [{**numbered, "function": {"name": "weather", "arguments": rome}}],
                      [{**numbered, "function": {"name": "time", "arguments": "{}"}}]) == [
            _call(None, "weather", paris), _call(None, "weather", rome), _call(None, "time", "{}")]
    # The arguments so far sent again with more, in every part: not summed.
    assert _calls([{"index": 0, "id": "a", "function": {"name": "weather", "arguments": paris[:5]}}],
                  [{"index": 0, "id": "a", "function": {"name": "weather", "arguments": paris}}]) == [
        _call("a", "weather", paris)]
    # A whole answer's calls: their positions.
    assert _calls([{"id": "a", "function": {"name": "weather", "arguments": paris}},
                   {"id": "b", "function": {"name": "time", "arguments": rome}}]) == [
        _call("a", "weather", paris), _call("b", "time", rome)]
    assert _calls() is None


def test_a_tool_call_is_metered_once_however_its_parts_repeat_it():
    def streamed(*chunks: list[dict]) -> str:
        generation = Generation([])
        for parts in chunks:
            generation.feed(Chunk(calls_tools=True, tool_calls=tuple(parts)))
        return generation.outcome().streamed

    plain = streamed([{"index": 0, "id": "a", "function": {"name": "weather", "arguments": ""}}],
                     [{"index": 0, "function": {"arguments": '{"city": '}}],
                     [{"index": 0, "function": {"arguments": '"Paris"}'}}])
    repeated = streamed([{"index": 0, "id": "a", "function": {"name": "weather", "arguments": ""}}],
                        [{"index": 0, "id": "a", "function": {"name": "weather", "arguments": '{"city": '}}],
                        [{"index": 0, "id": "a", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}])
    assert plain == repeated == 'weather{"city": "Paris"}'
