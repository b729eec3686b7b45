"""TailOnly: its guarantees as properties over random histories, with real tokenizers
(OpenAI's accounting and the bundled model's chat template), and its cost on a long one."""

from __future__ import annotations

import copy

import pytest
from guarantees import TOKENIZERS, check_guarantees, histories
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenguard import Guard, InputTooLong, get_tokenizer
from tokenguard.context import TailOnly, TurnCosts, turn_cost, turns
from tokenguard.context.messages import turn_key


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), budget=st.integers(5, 400))
def test_every_guarantee_holds(name, data, budget):
    tokenizer = TOKENIZERS[name]
    history = data.draw(histories(call_content=None if name == "gpt-4o" else ""))
    before = copy.deepcopy(history)
    try:
        fitted = TailOnly().fit(history, budget, tokenizer)
    except InputTooLong:
        systems = [m for m in history if m["role"] == "system"]
        assert tokenizer.count_messages([*systems, history[-1]]) > budget
    else:
        check_guarantees(history, fitted, budget, tokenizer)
    assert history == before  # the input is not changed


def test_a_long_history_costs_what_is_kept():
    tokenizer = TOKENIZERS["gpt-4o"]
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(5_000):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    strategy = TailOnly()
    fitted = strategy.fit(history, 500, tokenizer)
    assert tokenizer.count_messages(fitted) <= 500 and fitted[0]["role"] == "system"
    assert fitted[-1] == history[-1] and len(fitted) > 20
    assert len(strategy._costs) <= len(fitted) + 2  # only the turns it looked at were counted
    assert strategy.fit(history, 500, tokenizer) == fitted  # and a second fit is the same


def test_an_orphan_tool_result_is_never_sent():
    history = [
        {"role": "tool", "tool_call_id": "gone", "content": "42"},
        {"role": "user", "content": "and?"},
    ]
    assert turns(history) == [[history[-1]]]  # the orphan belongs to no turn
    assert TailOnly().fit(history, 1_000, TOKENIZERS["gpt-4o"]) == [history[-1]]


def _echo(messages, max_tokens):
    return "noted " * 5


def test_a_guard_fits_a_long_chat_into_max_context_tokens():
    guard = Guard(_echo, model="gpt-4o", max_context_tokens=120, max_input_tokens=40)
    tokenizer = TOKENIZERS["gpt-4o"]
    for i in range(40):
        reply = guard.chat(f"Fact number {i}: the sky is blue.", session="s")
        assert reply.usage.input_tokens == tokenizer.count_messages(reply.messages) <= 120
        assert reply.messages[-1]["content"] == f"Fact number {i}: the sky is blue."
    assert len(guard.history.get("s")) == 80  # the history keeps everything; the prompt does not
    with pytest.raises(InputTooLong):  # max_input_tokens caps the new turn, not the history
        guard.chat("word " * 100, session="s")


@pytest.mark.slow
def test_the_bundled_model_s_window_bounds_the_prompt(bundled_runner):
    from tokenguard.backends import BundledRunner

    guard = Guard(BundledRunner(bundled_runner), max_output_tokens=8, max_context_tokens=150)
    assert guard.fit is not None
    for i in range(12):
        reply = guard.chat(f"Remember the number {i}.", session="w", temperature=0.0)
        assert reply.usage.input_tokens <= 150
    assert guard.fit.budget(guard.prepare("x")) == min(150, bundled_runner.context_length - 8)
    guard.end_session("w")  # the runner is shared by the test session: give its KV blocks back


def test_an_api_model_s_window_comes_from_the_catalogue():
    guard = Guard(_echo, model="gpt-4o", max_output_tokens=100)
    assert guard.fit is not None and guard.fit.budget(guard.prepare("x")) == 128_000 - 100
    unknown = Guard(_echo, model="my-own-model", tokenizer="gpt-4o")
    assert unknown.fit is not None and unknown.fit.budget(unknown.prepare("x")) is None  # nothing bounds it
    # A short prompt that fits is sent as it is and counted once, not fitted.
    reply = guard.complete([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert len(reply.messages) == 2


def test_turn_counts_are_remembered_least_recently_used_first():
    tokenizer = get_tokenizer("gpt-4o")
    costs = TurnCosts(size=2)
    a, b, c = ([{"role": "user", "content": text}] for text in ("alpha", "beta beta", "gamma gamma gamma"))
    assert costs(tokenizer, a) == turn_cost(tokenizer, a)
    costs(tokenizer, b)
    costs(tokenizer, a)  # a is now the most recently used
    costs(tokenizer, c)  # so b is dropped
    assert len(costs) == 2
    keys = [f"{tokenizer.name}:{turn_key(t)}" for t in (a, b, c)]
    assert costs.lookup(keys) == [turn_cost(tokenizer, a), None, turn_cost(tokenizer, c)]


def test_a_history_without_a_user_message_says_every_message_is_kept():
    history = [{"role": "system", "content": "Be brief."},
               *({"role": "assistant", "content": f"Note {i}: nothing to add."} for i in range(50))]
    with pytest.raises(InputTooLong, match=r"newest user message \(there is none: every message is kept\) take"):
        TailOnly().fit(history, 100, TOKENIZERS["gpt-4o"])


def test_a_trailing_system_message_is_counted_once_by_the_guard():
    # A closing "answer in JSON" reminder is both a system message and the newest one.
    rules = {"role": "system", "content": "Answer in JSON with the keys name and city. " * 60}
    history = [{"role": "user", "content": f"Question {i} about the weather in some city?"} for i in range(60)]
    guard = Guard(lambda messages, max_tokens: "{}", model="gpt-4o", max_context_tokens=1000, stop=None)
    reply = guard.complete([*history, rules])  # was InputTooLong: the reminder was counted twice
    assert reply.usage.input_tokens <= 1000 and reply.messages[-1] == rules
