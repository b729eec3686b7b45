"""RepetitionStop: no false stops on natural text, every loop stopped soon after it
starts, on every backend and every API, with bounded memory. The corpus is shared
with benchmarks/bench_repetition.py, which also measures speed and savings."""

from __future__ import annotations

import asyncio

import pytest
import repetition_corpus as corpus

import tokenguard as tg
from tokenguard import ConfigError, Guard, RepetitionStop
from tokenguard._repetition import _TAIL_CHARS
from tokenguard.backends import BundledRunner

TOK = tg.get_tokenizer("gpt-4o")
SMOLLM = tg.get_tokenizer("SmolLM2-135M-Instruct")
PREFIX = "Here is a haiku about budgets:\n\nNumbers in a row,\n"
LINE = "A budget is a canvas of choices,\n"


@pytest.mark.parametrize("size", [1, 7, 1_000_000])
def test_natural_texts_are_never_stopped(size):
    samples = corpus.handwritten_natural() if size == 1 else corpus.natural(real_limit=25)
    stopped = [s.name for s in samples if corpus.first_stop(s.text, size) is not None]
    assert stopped == [], f"false stops: {stopped}"


def test_every_loop_stops_within_120_tokens_of_its_start():
    samples = corpus.looping()
    assert len(corpus.recorded_loops()) >= 5  # the bundled model's own loops are part of it
    for sample in samples:
        stopped_at = corpus.first_stop(sample.text, 4)
        assert stopped_at is not None, f"missed: {sample.name}"
        assert sample.loop_start is not None
        spent = SMOLLM.count(sample.text[sample.loop_start : max(stopped_at, sample.loop_start)])
        assert spent <= 120, f"{sample.name}: {spent} tokens from the loop's start"


def looping(messages, *, max_tokens):
    looping.closed = False
    try:
        yield PREFIX
        for _ in range(10_000):
            yield LINE
    finally:
        looping.closed = True


async def alooping(messages, *, max_tokens):
    for piece in looping(messages, max_tokens=max_tokens):
        yield piece


def _check(reply: tg.Reply, guard: Guard, max_out: int) -> None:
    assert reply.stop_reason == "repetition"
    assert reply.text == PREFIX + LINE  # the repeats are left out of the reply
    streamed = reply.usage.output_tokens
    assert streamed > TOK.count(reply.text)  # ... but they were generated and are metered
    assert reply.usage.saved_tokens == max_out - streamed > 0
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "repetition" and row["saved_tokens"] == reply.usage.saved_tokens


def test_complete_stops_a_loop_closes_the_backend_and_keeps_one_copy():
    budget = tg.Budget(tokens=100_000)
    guard = Guard(looping, model="gpt-4o", max_output_tokens=500, budget=budget)
    reply = guard.complete("Write a haiku about budgets.")
    _check(reply, guard, 500)
    assert looping.closed
    assert budget.spent()["tokens"] == reply.usage.total_tokens and budget.spent()["reserved_tokens"] == 0


def test_a_stream_shows_what_streamed_and_its_reply_keeps_one_copy():
    guard = Guard(looping, model="gpt-4o", max_output_tokens=500)
    stream = guard.stream("Write a haiku about budgets.")
    text = "".join(stream)
    assert text.startswith(PREFIX + LINE + LINE) and text.count(LINE) > 2
    _check(stream.reply, guard, 500)


def test_async_and_the_decorator_stop_loops_too():
    guard = Guard(alooping, model="gpt-4o", max_output_tokens=500)
    _check(asyncio.run(guard.acomplete("go")), guard, 500)

    @tg.guard(model="gpt-4o", max_output_tokens=400, stop=RepetitionStop())
    def ask(messages, max_tokens):
        return looping(messages, max_tokens=max_tokens)

    _check(ask("go"), ask.guard, 400)


def test_a_whole_reply_from_a_non_streaming_backend_is_cut_too():
    guard = Guard(lambda messages: PREFIX + LINE * 200, model="gpt-4o", max_output_tokens=4000)
    reply = guard.complete("go")
    assert reply.stop_reason == "repetition" and reply.text == PREFIX + LINE


def test_it_is_on_by_default_and_stop_none_turns_it_off():
    assert any(isinstance(w, RepetitionStop) for w in Guard(looping, model="gpt-4o").watchers)
    guard = Guard(looping, model="gpt-4o", max_output_tokens=200, stop=None)
    reply = guard.complete("go")
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 200 and reply.usage.saved_tokens == 0


def test_a_list_numbered_in_parentheses_whose_items_are_all_the_same_is_a_loop():
    items = "".join(f"({i}) Berries are a good source of fibre and vitamins.\n" for i in range(1, 30))
    reply = Guard(lambda messages, max_tokens: iter(items.splitlines(keepends=True)), model="gpt-4o").complete("x")
    assert reply.stop_reason == "repetition" and reply.text.count("Berries") == 1


def test_lines_that_close_one_level_after_another_are_no_loop():
    # "</div>" or "}" at each depth of nesting: the same text, at another indentation.
    depth = 8
    html = "".join(f"{'    ' * i}<div class=\"level-{i}\">\n" for i in range(depth)) + "    " * depth + "<p>Hi</p>\n"
    html += "".join(f"{'    ' * i}</div>\n" for i in reversed(range(depth)))
    reply = Guard(lambda messages, max_tokens: iter(html.splitlines(keepends=True)), model="gpt-4o").complete("page")
    assert reply.stop_reason == "stop" and reply.text == html
    same_depth = "    </div>\n" * 20  # at one indentation, it is a loop
    looping = Guard(lambda messages, max_tokens: iter([same_depth]), model="gpt-4o").complete("page")
    assert looping.stop_reason == "repetition"


def test_a_run_of_one_character_is_judged_as_one_however_it_is_read():
    # "=" is periodic every 1, 2, 3, ... bytes; only the one-byte pattern's need counts.
    def stop_at(text: str) -> int | None:
        return corpus.first_stop(text, 4)

    rule = RepetitionStop()
    assert stop_at("=" * (rule.min_run_span - 20) + "\nDone.") is None
    assert stop_at("─" * (rule.min_run_span // 3 - 10) + "\nDone.") is None
    assert stop_at("Wow" + "!" * 2000) == 3 + rule.min_run_span
    assert stop_at("ab" + "cd" * 1000) == 2 + rule.min_run_span
    assert stop_at("x" + "abcd" * 1000) == 1 + rule.min_span  # four bytes: the usual need


def test_memory_stays_bounded_on_long_output():
    rule = RepetitionStop()
    watch = rule.watch()
    words = [f"w{i * 7919 % 10007} " for i in range(300_000)]  # ~2 MB that never repeats
    for i in range(0, len(words), 5):
        assert isinstance(watch.feed("".join(words[i : i + 5]) + ("\n" if i % 40 == 0 else "")), str)
    assert len(watch._history) == rule.max_period
    assert len(watch._units) <= 8 * rule.max_units
    assert watch._tail_chars <= _TAIL_CHARS + 64


def test_bad_options_are_config_errors():
    for options in ({"min_repeats": 1}, {"min_span": 0}, {"min_run_span": 0}, {"max_period": 0}, {"max_units": 0}):
        with pytest.raises(ConfigError):
            RepetitionStop(**options)


@pytest.mark.slow
def test_the_bundled_model_s_own_loop_is_stopped_and_its_sequence_freed(bundled_runner):
    guard = Guard(BundledRunner(bundled_runner), max_output_tokens=320)
    reply = guard.complete("Give me a list of ten fruits.", temperature=0.0)
    assert reply.stop_reason == "repetition"
    assert 0 < reply.usage.output_tokens < 320 and reply.usage.saved_tokens == 320 - reply.usage.output_tokens
    assert bundled_runner.stats()["running"] == 0


def test_a_loop_in_a_whole_answer_is_metered_whole_and_saves_nothing():
    # A function that returns its whole answer (a str or a completion) had generated every repeat.
    text = "I am fine. " * 200
    guard = Guard(lambda messages, max_tokens: text, model="gpt-4o", max_output_tokens=1000)
    reply = guard.complete("How are you?")
    assert reply.stop_reason == "repetition" and len(reply.text) < len(text)
    assert reply.usage.output_tokens == guard.tokenizer.count(text) and reply.usage.saved_tokens == 0

    def completion(messages, max_tokens):
        return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 801, "total_tokens": 810}}

    reply = Guard(completion, model="gpt-4o", max_output_tokens=1000).complete("How are you?")
    assert reply.stop_reason == "repetition" and reply.usage.output_tokens == 801 and reply.usage.saved_tokens == 0


def test_a_loop_in_a_whole_answer_past_the_output_cap_is_still_cut_to_one_copy():
    listing = "Here is the list:\n" + "".join(f"{i}. Berries are good.\n" for i in range(1, 120))

    def answer(messages, *, max_tokens):
        return listing  # a whole answer, longer than the cap: the cap and the loop in one piece

    reply = Guard(answer, model="gpt-4o", max_output_tokens=512).complete("list")
    assert reply.stop_reason == "repetition" and reply.text.count("Berries") == 1
    assert reply.usage.output_tokens == 512  # generated to the cap, metered to it
