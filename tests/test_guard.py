"""Guard, sync: the pipeline admit, reserve, generate, meter, settle around real
tokenizers, real SQLite and plain-function backends."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from pathlib import Path

import pytest

from tokenguard import Budget, Guard, InvalidRequest, Ledger, Reply
from tokenguard.accounting import Pricing, UnknownPriceWarning
from tokenguard.backends import BundledRunner, Function, OpenAICompatible
from tokenguard.context import SessionHistory
from tokenguard.errors import BudgetExceeded, ConfigError, InputTooLong, TokenGuardError
from tokenguard.tokens import DEFAULT_MODEL_NAME, get_tokenizer

TOK = get_tokenizer("gpt-4o")


class Calls:
    """A backend function that records how it was called."""

    def __init__(self, reply="The capital of France is Paris."):
        self.reply = reply
        self.calls: list[tuple] = []

    def __call__(self, messages, *, max_tokens, **params):
        self.calls.append((messages, max_tokens, params))
        return self.reply


def endless(messages, *, max_tokens):
    """A backend that ignores max_tokens and never stops."""
    endless.closed = False
    try:
        while True:
            yield "word "
    finally:
        endless.closed = True


def test_complete_meters_exactly_and_writes_one_row():
    fn = Calls()
    guard = Guard(fn, model="gpt-4o")
    reply = guard.complete("What is the capital of France?", user="alice", session="s1", tags={"t": 1})
    assert isinstance(reply, Reply)
    assert reply.text == fn.reply and reply.stop_reason == "stop"
    assert reply.messages == [{"role": "user", "content": "What is the capital of France?"}]
    assert reply.usage.input_tokens == TOK.count_messages(reply.messages)
    assert reply.usage.output_tokens == TOK.count(fn.reply)
    assert reply.usage.cost_usd == pytest.approx(
        Pricing().cost("gpt-4o", reply.usage.input_tokens, reply.usage.output_tokens)
    )
    assert reply.usage.latency_s > 0
    (row,) = guard.ledger.records()
    assert row["request_id"] == reply.request_id
    assert (row["user"], row["session"], row["tags"], row["model"], row["backend"]) == (
        "alice", "s1", {"t": 1}, "gpt-4o", "function",
    )
    assert (row["input_tokens"], row["output_tokens"], row["stop_reason"]) == (
        reply.usage.input_tokens, reply.usage.output_tokens, "stop",
    )
    assert fn.calls[0][1] == 512  # the default max_output_tokens reaches the function


def test_stream_yields_pieces_and_then_the_reply():
    guard = Guard(lambda messages, max_tokens: iter(["Hel", "lo", ", world"]), model="gpt-4o")
    stream = guard.stream("hi")
    assert stream.reply is None
    assert list(stream) == ["Hel", "lo", ", world"]
    assert stream.reply.text == "Hello, world"
    assert stream.reply.usage.output_tokens == TOK.count("Hello, world")
    assert len(guard.ledger.records()) == 1


def test_output_cap_stops_and_closes_a_backend_that_ignores_it():
    guard = Guard(endless, model="gpt-4o", max_output_tokens=20)
    reply = guard.complete("go")
    assert endless.closed
    assert reply.stop_reason == "length"
    assert reply.usage.output_tokens == 20 == TOK.count(reply.text)
    assert guard.ledger.records()[0]["output_tokens"] == 20


def test_output_cap_on_a_long_string_and_per_call_max_tokens():
    fn = Calls("lorem ipsum dolor sit amet " * 200)
    guard = Guard(fn, model="gpt-4o", max_output_tokens=50)
    assert guard.complete("x").usage.output_tokens == 50
    reply = guard.complete("x", max_tokens=7, temperature=0.3)
    assert reply.usage.output_tokens == 7 and reply.stop_reason == "length"
    assert fn.calls[-1][1:] == (7, {"temperature": 0.3})
    guard.complete("x", max_tokens=10_000)  # a call may lower the cap, never raise it
    assert fn.calls[-1][1] == 50


@pytest.mark.parametrize("where", ["name", "tool call arguments", "extra field"])
def test_max_input_tokens_bounds_every_field_not_only_content(read_probe, where):
    fn = Calls()
    guard = Guard(fn, model="gpt-4o", max_input_tokens=100)
    huge = read_probe("word " * 2_000_000)  # 10 MB
    messages = {
        "name": [{"role": "user", "content": "hi", "name": huge}],
        "tool call arguments": [
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": huge}}]},
            {"role": "tool", "tool_call_id": "1", "content": "r"}, {"role": "user", "content": "hi"}],
        "extra field": [{"role": "user", "content": "hi", "cache_control": {"note": huge}}],
    }[where]
    with pytest.raises(InputTooLong):
        guard.complete(messages)
    assert 0 < huge.furthest <= 16 * 101 and not fn.calls  # bounded work, as for content


def test_the_context_window_alone_refuses_a_huge_message_with_bounded_work(read_probe):
    guard = Guard(Calls(), model="gpt-4o", max_context_tokens=1000)  # no max_input_tokens
    huge = read_probe("word " * 2_000_000)
    with pytest.raises(InputTooLong, match="take over the 1000 tokens the context may use"):
        guard.complete([{"role": "system", "content": "Be brief."}, {"role": "user", "content": huge}])
    assert 0 < huge.furthest <= 16 * 1001


def test_an_output_cap_that_fills_the_window_says_so():
    fn = Calls()
    guard = Guard(fn, model="gpt-4", max_output_tokens=8192)  # gpt-4's whole 8,192-token window
    with pytest.raises(InputTooLong, match="max_tokens=8192 leaves no room for a prompt in the model's 8192-token"):
        guard.complete("hi")
    assert fn.calls == [] and guard.complete("hi", max_tokens=100).text


def test_max_input_tokens_refuses_before_the_backend(read_probe):
    fn = Calls()
    guard = Guard(fn, model="gpt-4o", max_input_tokens=100)
    huge = read_probe("word " * 2_000_000)  # 10 MB
    with pytest.raises(InputTooLong) as info:
        guard.complete(huge)
    assert 0 < huge.furthest <= 16 * 101  # bounded work: only a head was tokenized
    assert info.value.limit == 100
    assert "100" in str(info.value) and "exceeds" in str(info.value)
    # Text just under the cap alone, but over it with the chat template: exact check.
    with pytest.raises(InputTooLong):
        guard.complete([{"role": "system", "content": "a " * 50}, {"role": "user", "content": "b " * 49}])
    assert fn.calls == []
    rows = guard.ledger.records()
    assert [r["stop_reason"] for r in rows] == ["input_too_long", "input_too_long"]
    assert rows[0]["input_tokens"] == 0 and "InputTooLong" in rows[0]["error"]
    assert guard.complete("short").stop_reason == "stop"


def test_max_completion_tokens_is_max_tokens_by_its_newer_name():
    fn = Calls("ok")
    guard = Guard(fn, model="gpt-4o", max_output_tokens=512)
    guard.complete("hi", max_completion_tokens=40)
    guard.complete("hi", max_completion_tokens=3000)  # may lower the guard's cap, never raise it
    assert [(max_tokens, params) for _, max_tokens, params in fn.calls] == [(40, {}), (512, {})]
    with pytest.raises(InvalidRequest, match="not both"):
        guard.complete("hi", max_tokens=10, max_completion_tokens=20)


def test_budget_refuses_before_the_backend_and_settles_to_actual_use():
    fn = Calls("ok")
    budget = Budget(tokens=300)
    guard = Guard(fn, model="gpt-4o", max_output_tokens=100, budget=budget)
    reply = guard.complete("hello")
    assert budget.spent()["tokens"] == reply.usage.total_tokens
    assert budget.spent()["reserved_tokens"] == 0
    big = "word " * 250  # input + 100 worst-case output > what is left
    with pytest.raises(BudgetExceeded):
        guard.complete(big)
    assert len(fn.calls) == 1
    assert guard.ledger.records()[-1]["stop_reason"] == "budget_exceeded"
    totals = guard.ledger.totals()
    assert budget.spent()["tokens"] == totals["input_tokens"] + totals["output_tokens"]


def test_tool_definitions_are_input_capped_reserved_metered_and_fitted(read_probe):
    tok = get_tokenizer("gpt-4o")
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "Looks a thing up in the catalogue. " * 20,
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "What to look up"}}},
    }} for i in range(20)]
    tool_tokens = tok.count_tools(tools)
    assert tool_tokens > 2000
    fn = Calls("ok")
    guard = Guard(fn, model="gpt-4o", max_output_tokens=10)
    reply = guard.complete("hi", tools=tools)
    assert reply.usage.input_tokens == tok.count_messages([{"role": "user", "content": "hi"}]) + tool_tokens
    assert fn.calls[-1][2]["tools"] == tools  # the backend got them
    budget = Budget(tokens=1000)
    with pytest.raises(BudgetExceeded, match="needs up to"):  # reserved: tools + messages + output
        Guard(fn, model="gpt-4o", max_output_tokens=10, budget=budget).complete("hi", tools=tools)
    assert budget.spent()["tokens"] == 0 and len(fn.calls) == 1
    huge = read_probe("word " * 2_000_000)
    big_tools = [{"type": "function", "function": {"name": "f", "description": huge}}]
    with pytest.raises(InputTooLong):  # with bounded work, as for messages
        Guard(fn, model="gpt-4o", max_input_tokens=100).complete("hi", tools=big_tools)
    assert 0 < huge.furthest <= 16 * 101 and len(fn.calls) == 1
    # The context window holds the tools whole: the history is fitted into what is left.
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(200)]
    window = Guard(fn, model="gpt-4o", max_output_tokens=10, max_context_tokens=tool_tokens + 500)
    fitted = window.complete(history, tools=tools)
    assert fitted.usage.input_tokens <= tool_tokens + 500
    assert tok.count_messages(fn.calls[-1][0]) <= 500
    with pytest.raises(InputTooLong, match="tokens of tools"):
        Guard(fn, model="gpt-4o", max_output_tokens=10, max_context_tokens=tool_tokens).complete(history, tools=tools)


def test_usd_budget_per_user_and_several_budgets_at_once():
    per_user = Budget(usd=0.0011, per="user")  # worst case 0.00102, actual 0.00003 a call
    overall = Budget(tokens=10_000)
    guard = Guard(Calls("ok"), model="gpt-4o", max_output_tokens=100, budget=[per_user, overall])
    for _ in range(3):
        guard.complete("hi", user="alice")
    with pytest.raises(BudgetExceeded) as info:
        guard.complete("hi", user="alice")
    assert info.value.budget is per_user and info.value.unit == "usd"
    guard.complete("hi", user="bob")  # bob's own budget
    # the refused call left no hold in the other budget
    assert overall.spent()["reserved_tokens"] == 0
    assert overall.spent()["tokens"] == sum(
        r["input_tokens"] + r["output_tokens"] for r in guard.ledger.records()
    )
    assert per_user.spent(user="alice")["usd"] == pytest.approx(
        guard.ledger.totals(user="alice")["cost_usd"], abs=1e-9
    )


def test_two_budgets_with_one_name_in_one_store_are_refused(tmp_path):
    path = tmp_path / "b.sqlite"
    with pytest.raises(ConfigError, match="share one store"):
        Guard(Calls(), model="gpt-4o", budget=[Budget(tokens=5, store=path), Budget(tokens=9, store=path)])


def test_backend_error_midway_meters_what_was_seen_and_settles_it():
    def breaks(messages, *, max_tokens):
        yield "one two three"
        raise ConnectionError("stream broke")

    budget = Budget(tokens=10_000)
    guard = Guard(breaks, model="gpt-4o", budget=budget)
    stream = guard.stream("hi")
    assert next(stream) == "one two three"
    with pytest.raises(ConnectionError):
        next(stream)
    assert stream.reply.stop_reason == "error" and stream.reply.text == "one two three"
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "error" and "stream broke" in row["error"]
    assert row["output_tokens"] == TOK.count("one two three") and row["input_tokens"] > 0
    assert budget.spent()["tokens"] == row["input_tokens"] + row["output_tokens"]
    assert budget.spent()["reserved_tokens"] == 0


def test_backend_error_before_any_output_releases_the_budget():
    def fails(messages, *, max_tokens):
        raise RuntimeError("backend down")

    budget = Budget(tokens=10_000)
    guard = Guard(fails, model="gpt-4o", budget=budget)
    with pytest.raises(RuntimeError, match="backend down"):
        guard.complete("hi")
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "error" and row["input_tokens"] == 0 and row["cost_usd"] == 0
    assert budget.spent() == {"tokens": 0, "usd": 0.0, "reserved_tokens": 0, "reserved_usd": 0.0}


def test_closed_and_abandoned_streams_are_metered_as_cancelled():
    budget = Budget(tokens=100_000)
    guard = Guard(endless, model="gpt-4o", budget=budget)
    with guard.stream("go") as stream:
        next(stream)
        next(stream)
    assert endless.closed
    assert stream.reply.stop_reason == "cancelled" and stream.reply.text == "word word "
    assert stream.reply.usage.output_tokens == TOK.count("word word ")

    abandoned = guard.stream("never iterated")
    del abandoned
    gc.collect()
    rows = guard.ledger.records()
    assert [r["stop_reason"] for r in rows] == ["cancelled", "cancelled"]
    assert budget.spent()["reserved_tokens"] == 0
    assert budget.spent()["tokens"] == rows[0]["input_tokens"] + rows[0]["output_tokens"]


def test_openai_completion_dict_usage_is_used_with_the_cached_rate():
    completion = {
        "choices": [{"message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 800}},
    }
    guard = Guard(lambda messages: completion, model="gpt-4o")
    reply = guard.complete("hi")
    assert reply.text == "Hi!"
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (1000, 3, 800)
    assert reply.usage.cost_usd == pytest.approx(Pricing().cost("gpt-4o", 1000, 3, 800))
    assert reply.usage.cost_usd < Pricing().cost("gpt-4o", 1000, 3)


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -100_000, "completion_tokens": -10}, {"prompt_tokens": float("nan"), "completion_tokens": "3"},
])
def test_a_negative_or_nan_usage_is_not_believed(usage):
    completion = {"choices": [{"message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
                  "usage": usage}
    budget = Budget(tokens=1000)
    guard = Guard(lambda messages, max_tokens: completion, model="gpt-4o", budget=budget, max_output_tokens=10)
    reply = guard.complete("hi")  # counted by the guard instead: no credit for later calls
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (TOK.count_messages(
        [{"role": "user", "content": "hi"}]), TOK.count("Hi!"))
    assert budget.spent()["tokens"] == reply.usage.total_tokens > 0


def test_a_backend_reporting_numpy_counts_is_metered_and_recorded():
    import numpy as np

    from tokenguard.backends.base import Backend, BackendUsage, Chunk

    class Reports(Backend):  # a backend of one's own, counting with numpy
        name, model = "custom", "gpt-4o"

        def stream(self, messages, params):
            yield Chunk(text="hi")
            yield Chunk(finish_reason="stop", usage=BackendUsage(np.int64(7), np.float64(1.0), np.int64(9)))

        async def astream(self, messages, params):
            for chunk in self.stream(messages, params):
                yield chunk

    guard = Guard(Reports())
    reply = guard.complete("x")
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (7, 1, 7)
    assert guard.ledger.records()[0]["input_tokens"] == 7


def test_a_server_s_reported_output_past_the_cap_is_billed_to_the_cap():
    # A server that ignored max_tokens said it wrote 600 tokens: the budget went 588 under.
    completion = {"choices": [{"message": {"role": "assistant", "content": "word " * 600}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 11, "completion_tokens": 600}}
    budget = Budget(tokens=1000)
    guard = Guard(lambda messages, max_tokens: completion, model="gpt-4o", budget=budget, max_output_tokens=10)
    reply = guard.complete("hi")
    assert reply.usage.output_tokens == 10 and budget.spent()["tokens"] == 11 + 10


def test_cached_tokens_beyond_the_prompt_are_capped_at_it():
    completion = {"choices": [{"message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 100, "completion_tokens": 3,
                            "prompt_tokens_details": {"cached_tokens": 500}}}
    reply = Guard(lambda messages: completion, model="gpt-4o").complete("hi")
    assert reply.usage.cached_input_tokens == 100
    assert reply.usage.cost_usd == pytest.approx(Pricing().cost("gpt-4o", 100, 3, 100))


def test_openai_stream_chunks_with_final_usage():
    chunks = [
        {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
    ]
    guard = Guard(lambda messages: iter(chunks), model="gpt-4o")
    reply = guard.complete("hi")
    assert reply.text == "Hello" and reply.stop_reason == "stop"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (9, 2)


def test_backend_finish_reason_length_is_kept():
    chunks = [{"choices": [{"delta": {"content": "Hi"}, "finish_reason": "length"}]}]
    assert Guard(lambda m: iter(chunks), model="gpt-4o").complete("x").stop_reason == "length"


def test_a_chat_without_a_session_is_refused_not_silently_forgetful():
    guard = Guard(Calls("ok"), model="gpt-4o")
    with pytest.raises(InvalidRequest, match="session="):
        guard.chat("hi", session=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="session="):
        asyncio.run(guard.achat("hi", session=None))  # type: ignore[arg-type]


def test_chat_keeps_the_session_history():
    fn = Calls("Noted.")
    guard = Guard(fn, model="gpt-4o")
    guard.chat("My name is Ada.", session="s")
    reply = guard.chat("What is my name?", session="s", user="ada")
    assert reply.messages == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert fn.calls[-1][0] == reply.messages
    assert reply.usage.input_tokens == TOK.count_messages(reply.messages)
    assert guard.chat("Hi", session="other").messages == [{"role": "user", "content": "Hi"}]
    assert [r["session"] for r in guard.ledger.records()] == ["s", "s", "other"]


def test_unknown_price_is_none_and_a_usd_budget_refuses_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = Guard(Calls("ok"), model="gpt-4o", tokenizer="gpt-4o")
        guard.model = "house-model-v7"
        assert guard.complete("hi").usage.cost_usd is None
    assert any(issubclass(w.category, UnknownPriceWarning) for w in caught)
    priced = Guard(Calls("ok"), model="house-model-v7", tokenizer="gpt-4o", prices={"house-model-v7": (1.0, 2.0)})
    assert priced.complete("hi").usage.cost_usd > 0
    with pytest.raises(ConfigError, match="no price is known for model 'house-model-v8'"):  # before any call
        Guard(Calls("ok"), model="house-model-v8", tokenizer="gpt-4o", budget=Budget(usd=1))
    refused = Guard(Calls("ok"), model="gpt-4o", tokenizer="gpt-4o", budget=Budget(usd=1))
    refused.model = "house-model-v8"  # a model whose price the guard learns only at the call
    with pytest.raises(TokenGuardError, match="price is unknown"):
        refused.complete("hi")
    assert refused.ledger.records()[0]["stop_reason"] == "error"


def test_a_function_s_model_must_be_named_not_guessed():
    with pytest.raises(ConfigError, match="pass model="):
        Guard(Calls("Bonjour"))
    guard = Guard(Calls("Bonjour"), model=DEFAULT_MODEL_NAME)
    reply = guard.complete("hi")
    assert reply.usage.input_tokens == get_tokenizer(DEFAULT_MODEL_NAME).count_messages(reply.messages)
    assert reply.usage.cost_usd == 0.0


def test_default_backend_is_the_bundled_runner_loaded_lazily():
    guard = Guard()
    assert isinstance(guard.backend, BundledRunner)
    assert guard.backend._runner is None and guard.model == DEFAULT_MODEL_NAME


def test_file_ledger_by_path(tmp_path):
    guard = Guard(Calls(), model="gpt-4o", ledger=tmp_path / "l.sqlite")
    guard.complete("hi")
    assert len(Ledger(tmp_path / "l.sqlite").records()) == 1


def test_callable_backend_wraps_functions_without_max_tokens():
    backend = Function(lambda messages: "hi")
    guard = Guard(backend, model="gpt-4o", max_output_tokens=3)
    assert guard.complete("x").text == "hi"


def test_a_prompt_that_cannot_be_counted_is_refused_before_the_backend():
    fn = Calls()
    budget = Budget(tokens=10_000)
    guard = Guard(fn, model="gpt-4o", budget=budget)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    with pytest.raises(TokenGuardError, match="cannot count"):
        guard.complete(image)
    assert fn.calls == []  # nothing was spent on a call the ledger could not meter
    (row,) = guard.ledger.records()
    assert row["stop_reason"] == "error" and "cannot count" in row["error"]
    assert budget.spent()["reserved_tokens"] == 0
    with pytest.raises(InvalidRequest, match="no content"):
        guard.complete([{"role": "user", "content": None}])


def test_a_per_user_budget_refuses_a_call_without_a_user():
    fn = Calls()
    guard = Guard(fn, model="gpt-4o", budget=Budget(tokens=10_000, per="user"))
    with pytest.raises(InvalidRequest, match="names no user"):
        guard.complete("hi")
    assert fn.calls == [] and guard.ledger.records()[0]["stop_reason"] == "error"
    assert guard.complete("hi", user="ada").text == fn.reply


def test_sessions_behave_alike_in_chat_and_chat_stream_and_only_there_carry_history():
    fn = Calls("Noted.")
    guard = Guard(fn, model="gpt-4o")
    guard.chat("My name is Ada.", session="s")
    with guard.chat_stream("What is my name?", session="s") as stream:
        assert "".join(stream) == "Noted."
    assert stream.reply.messages[0] == {"role": "user", "content": "My name is Ada."}
    assert len(guard.history.get("s")) == 4  # both turns, each with its reply
    guard.complete("Unrelated.", session="s")  # session= names it; history is chat's
    assert "".join(guard.stream("Also unrelated.", session="s")) == "Noted."
    assert len(guard.history.get("s")) == 4
    assert fn.calls[-1][0] == [{"role": "user", "content": "Also unrelated."}]

    async def turn():
        return await guard.achat_stream("And now?", session="s").aread()

    assert asyncio.run(turn()).messages[:4] == guard.history.get("s")[:4]
    assert len(guard.history.get("s")) == 6


def open_files(folder) -> list[str]:
    """The files under ``folder`` this process holds open."""
    names = []
    for fd in list(Path("/proc/self/fd").iterdir()):
        try:
            names.append(os.readlink(fd))
        except OSError:  # closed meanwhile (the listing's own)
            continue
    return sorted(name for name in names if name.startswith(str(folder)))


def test_a_guard_closes_what_it_holds(tmp_path):
    backend = OpenAICompatible("http://127.0.0.1:9/v1", "gpt-4o")
    _ = backend.client  # opened
    budget = Budget(tokens=1000, store=tmp_path / "b.sqlite")
    history = SessionHistory(path=tmp_path / "h.sqlite")
    with Guard(Calls("ok"), model="gpt-4o", ledger=tmp_path / "l.sqlite", budget=budget, history=history) as guard:
        guard.chat("hi", session="s")
        assert open_files(tmp_path)
    budget.close()  # a budget may be shared by other guards: its owner closes it
    assert open_files(tmp_path) == []
    assert guard.chat("again", session="s").text == "ok"  # a later call opens them again
    with Guard(backend, ledger=tmp_path / "l.sqlite") as guard:
        assert guard.backend is backend
    assert backend._client is None and guard.ledger.store.db._conn is None


@pytest.mark.slow
def test_a_llama_runner_is_a_backend_as_it_is(bundled_runner):
    guard = Guard(bundled_runner, max_output_tokens=4)
    assert isinstance(guard.backend, BundledRunner) and guard.backend.runner is bundled_runner
    assert guard.complete("Say hi.").usage.output_tokens <= 4


def test_openai_sdk_messages_are_taken_as_their_dicts():
    # The function-calling loop appends completion.choices[0].message to its list.
    from openai.types.chat import ChatCompletionMessage

    said = ChatCompletionMessage(role="assistant", content=None, tool_calls=[
        {"id": "1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}])
    messages = [{"role": "user", "content": "hi"}, said, {"role": "tool", "tool_call_id": "1", "content": "42"}]
    as_dicts = [messages[0], said.model_dump(exclude_none=True), messages[2]]
    fn = Calls("ok")
    reply = Guard(fn, model="gpt-4o").complete(messages)
    assert fn.calls[-1][0] == as_dicts and reply.usage.input_tokens == TOK.count_messages(as_dicts)


def test_an_input_at_its_cap_is_admitted_however_its_texts_count_alone():
    # The texts' own count is no lower bound of the prompt's: text parts count apart
    # (joined, "'r" and "rb" take 3 tokens, apart 2), and a template may leave a field out.
    parts = [{"type": "text", "text": p} for p in ["'r", "rb"] * 40]
    exact = TOK.count_messages([{"role": "user", "content": parts}])
    guard = Guard(Calls(), model="gpt-4o", max_input_tokens=exact)
    assert guard.complete([{"role": "user", "content": parts}]).usage.input_tokens == exact
    smol = Guard(Calls(), model="SmolLM2-135M-Instruct", max_input_tokens=200)  # its template shows no name
    assert smol.complete([{"role": "user", "content": "hi", "name": "agent_" + "x" * 900}]).stop_reason == "stop"
