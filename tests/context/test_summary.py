"""Summary: the guarantees over random histories, incremental and bounded summaries, and
summaries as metered calls of the guard (a function backend, then the bundled model)."""

from __future__ import annotations

import copy

import pytest
from guarantees import TOKENIZERS, check_guarantees, histories
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenguard import Budget, BudgetExceeded, ConfigError, Guard, InputTooLong
from tokenguard.context import Summary, TailOnly
from tokenguard.context.summary import INSTRUCTION, SUMMARY_HEADER

GPT = TOKENIZERS["gpt-4o"]


def _keep_tail(text: str) -> str:
    """A summarizer that needs no model: the end of what it is given, unbounded (the
    strategy must cut it to max_summary_tokens)."""
    return text[-2_000:]


def _history(turns: int) -> list[dict]:
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        history += [
            {"role": "user", "content": f"Note {i}: the locker code for gym {i} is {1000 + 7 * i}."},
            {"role": "assistant", "content": f"Noted, gym {i}."},
        ]
    return history


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), budget=st.integers(5, 400), keep=st.integers(0, 200), size=st.integers(1, 100))
def test_every_guarantee_holds(name, data, budget, keep, size):
    tokenizer = TOKENIZERS[name]
    history = data.draw(histories(call_content=None if name == "gpt-4o" else ""))
    before = copy.deepcopy(history)
    strategy = Summary(_keep_tail, keep_recent_tokens=keep, max_summary_tokens=size)
    try:
        fitted = strategy.fit(history, budget, tokenizer)
    except InputTooLong:
        systems = [m for m in history if m["role"] == "system"]
        assert tokenizer.count_messages([*systems, history[-1]]) > budget
    else:
        check_guarantees(history, fitted, budget, tokenizer, added=(SUMMARY_HEADER,))
        summaries = [m["content"] for m in fitted if m["role"] == "system" and m["content"].startswith(SUMMARY_HEADER)]
        assert all(tokenizer.count(text.removeprefix(SUMMARY_HEADER)) <= size for text in summaries)
    assert history == before


def test_a_conversation_that_fits_is_sent_as_it_is():
    asked = []
    history = [*_history(3), {"role": "user", "content": "Which gym?"}]
    assert Summary(asked.append).fit(history, 1_000, GPT) == history
    assert asked == []


def test_only_turns_newly_pushed_out_are_summarised():
    asked: list[str] = []

    def summarize(text: str) -> str:
        asked.append(text.split("New lines:\n", 1)[1])
        return f"summary {len(asked)}"

    strategy = Summary(summarize, keep_recent_tokens=60, max_summary_tokens=20)
    history = _history(40)
    for end in range(21, len(history) + 1, 2):  # one turn more each time, as a chat grows
        fitted = strategy.fit([*history[:end], {"role": "user", "content": "Which code?"}], 200, GPT)
        assert GPT.count_messages(fitted) <= 200
        assert fitted[1] == {"role": "system", "content": f"{SUMMARY_HEADER}summary {len(asked)}"}
    folded = "\n".join(asked).splitlines()
    assert len(folded) == len(set(folded))  # nothing was summarised twice
    oldest_sent = next(m for m in fitted[2:] if m["role"] != "system")
    assert len(folded) == history.index(oldest_sent) - 1  # and everything older was summarised
    assert folded[0] == "user: Note 0: the locker code for gym 0 is 1000."


def test_a_long_answer_is_cut_to_max_summary_tokens_and_the_whole_fits():
    strategy = Summary(lambda text: "word " * 5_000, keep_recent_tokens=40, max_summary_tokens=30)
    fitted = strategy.fit([*_history(30), {"role": "user", "content": "Which?"}], 150, GPT)
    summary = fitted[1]["content"].removeprefix(SUMMARY_HEADER)
    assert GPT.count(summary) == 30 and GPT.count_messages(fitted) <= 150


def test_chunks_bound_each_summarizer_call():
    sizes = []
    strategy = Summary(
        lambda text: sizes.append(GPT.count(text.split("New lines:\n", 1)[1])) or "ok",
        keep_recent_tokens=20,
        chunk_tokens=64,
    )
    history = _history(30)
    history[3]["content"] = "a very long note " * 500  # one huge message is cut, not sent whole
    strategy.fit([*history, {"role": "user", "content": "Which?"}], 400, GPT)
    assert len(sizes) > 5 and max(sizes) <= 64


def test_a_summary_request_and_the_summary_it_asks_for_fit_the_window():
    # The summary's own output needs room in the window too (the call it serves may ask
    # for fewer output tokens than the summary does).
    from tokenguard.backends import Function

    window, calls = 1024, []

    class SmallModel(Function):
        def context_window(self):
            return window

    def model(messages, max_tokens):
        calls.append(GPT.count_messages(messages) + max_tokens)
        summarising = messages[0]["content"].startswith(INSTRUCTION[:20])
        return " ".join(f"fact{k}" for k in range(max_tokens)) if summarising else "ok"

    guard = Guard(SmallModel(model), model="gpt-4o", max_output_tokens=512, context=Summary(), stop=None)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"Note {i}: locker {1000 + 7 * i}. " + "Detail. " * 300},
                    {"role": "assistant", "content": f"Noted {i}."}]
    guard.complete([*history, {"role": "user", "content": "Which locker?"}], max_tokens=16)
    assert len(calls) > 1 and max(calls) <= window


def test_a_session_whose_history_was_replaced_is_summarised_afresh():
    asked = []
    strategy = Summary(lambda text: asked.append(text) or "s", keep_recent_tokens=40, max_summary_tokens=30)
    question = {"role": "user", "content": "Which?"}
    strategy.fit([*_history(20), question], 200, GPT, session="s")
    calls = len(asked)
    other = [{"role": "user", "content": f"Fact {i}: the sky is blue."} for i in range(40)]
    strategy.fit([*other, question], 200, GPT, session="s")
    assert len(asked) > calls
    assert "(nothing yet)" in asked[calls] and "Fact 0: the sky is blue." in asked[calls]


def test_two_conversations_that_share_some_messages_never_share_a_summary():
    # Resent whole, without a session: both open with "Hello" and end with the same small talk.
    def echo(text: str) -> str:  # the summary so far, and the new lines
        before, lines = text.split("Summary so far:\n", 1)[1].split("\n\nNew lines:\n", 1)
        return ("" if before == "(nothing yet)" else before + " / ") + lines.replace("\n", " / ")

    def conversation(secret: str) -> list[dict]:
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
                    {"role": "user", "content": secret}, {"role": "assistant", "content": "Noted."}]
        for _ in range(14):
            messages += [{"role": "user", "content": "Thanks, anything else?"},
                         {"role": "assistant", "content": "Nothing else, you are all set."}]
        return [*messages, {"role": "user", "content": "What did I tell you?"}]

    strategy = Summary(echo, keep_recent_tokens=40, max_summary_tokens=120)
    alice = strategy.fit(conversation("Alice here: my PIN is 9931."), 260, GPT)
    bob = strategy.fit(conversation("Bob here: my order is 5512."), 260, GPT)
    assert "9931" in str(alice) and "5512" in str(bob)
    assert "9931" not in str(bob)


def test_a_summarizer_that_fails_midway_does_not_fold_the_chunks_before_it_again():
    folded: list[str] = []
    calls_until_down = [-1]  # set below: how many more calls answer before one fails

    def summarize(text: str) -> str:
        calls_until_down[0] -= 1
        if calls_until_down[0] == 0:
            raise RuntimeError("the summarizer is down")
        folded.extend(text.split("New lines:\n", 1)[1].splitlines())
        return f"{len(folded)} lines"

    strategy = Summary(summarize, keep_recent_tokens=30, max_summary_tokens=60, chunk_tokens=40)
    question = {"role": "user", "content": "Which code?"}
    strategy.fit([*_history(6), question], 150, GPT, session="s")
    calls_until_down[0] = 2  # the second chunk of the next fold fails
    with pytest.raises(RuntimeError, match="down"):
        strategy.fit([*_history(14), question], 150, GPT, session="s")
    strategy.fit([*_history(14), question], 150, GPT, session="s")
    assert len(folded) == len(set(folded)) > 8  # every line summarised once


def test_without_a_model_or_a_function_it_says_how_to_summarise():
    with pytest.raises(ConfigError, match="Guard"):
        Summary().fit([*_history(60), {"role": "user", "content": "?"}], 600, GPT)
    with pytest.raises(ConfigError, match="summarizer"):
        Summary(42)  # type: ignore[arg-type]


def _backend(messages, max_tokens):
    if messages[0]["content"] == INSTRUCTION:
        return "The user listed gym locker codes."
    return "ok"


def test_summaries_are_metered_calls_against_the_same_budget():
    strategy = Summary(keep_recent_tokens=60, max_summary_tokens=40)
    budget = Budget(tokens=20_000, per="user")
    guard = Guard(_backend, model="gpt-4o", context=strategy, max_context_tokens=200, budget=budget)
    for i in range(25):
        reply = guard.chat(f"Note {i}: the locker code for gym {i} is {1000 + 7 * i}.", session="s", user="ann")
        assert reply.usage.input_tokens <= 200
    assert reply.messages[0]["content"] == SUMMARY_HEADER + "The user listed gym locker codes."
    rows = guard.ledger.records()
    summaries = [row for row in rows if row["tags"] == "summary"]
    assert summaries and all(row["user"] == "ann" and row["session"] == "s" for row in summaries)
    assert all(row["output_tokens"] <= 40 for row in summaries)
    spent = sum(row["input_tokens"] + row["output_tokens"] for row in rows)
    assert budget.spent(user="ann")["tokens"] == spent  # the summaries count against the user's budget
    # A user out of budget is refused, summaries included, and every call is recorded.
    small = Budget(tokens=1_500, per="user")
    tight = Guard(_backend, model="gpt-4o", context=Summary(keep_recent_tokens=60, max_summary_tokens=40),
                  max_context_tokens=200, budget=small)
    with pytest.raises(BudgetExceeded):
        for i in range(25):
            tight.chat(f"Note {i}: the locker code for gym {i} is {1000 + 7 * i}.", session="s", user="bob")
    rows = tight.ledger.records()
    assert rows[-1]["stop_reason"] == "budget_exceeded" and any(row["tags"] == "summary" for row in rows)
    assert small.spent(user="bob")["tokens"] == sum(row["input_tokens"] + row["output_tokens"] for row in rows
                                                    if row["stop_reason"] != "budget_exceeded")


def test_a_summary_is_a_child_of_the_call_it_serves_and_not_held_to_the_caller_s_input_cap():
    # max_input_tokens caps what a caller sends (a 15-token turn), not the guard's own summary prompts.
    guard = Guard(_backend, model="gpt-4o", context=Summary(keep_recent_tokens=60, max_summary_tokens=40),
                  max_context_tokens=200, max_input_tokens=40)
    for i in range(25):
        guard.chat(f"Note {i}: the locker code for gym {i} is {1000 + 7 * i}.", session="s")
    rows = guard.ledger.records()
    assert all(row["stop_reason"] == "stop" for row in rows)
    calls = {row["request_id"]: row for row in rows}
    summaries = [row for row in rows if row["tags"] == "summary"]
    assert summaries and all(row["depth"] == 1 for row in summaries)
    for row in summaries:
        parent = calls[row["parent_id"]]
        assert parent["tags"] is None and parent["depth"] == 0 and row["root_id"] == parent["request_id"]


@pytest.mark.slow
def test_the_bundled_model_summarises_a_short_history(bundled_runner):
    from tokenguard.backends import BundledRunner

    strategy = Summary(keep_recent_tokens=40, max_summary_tokens=32)
    guard = Guard(BundledRunner(bundled_runner), context=strategy, max_context_tokens=160, max_output_tokens=12)
    facts = ["My name is Ada.", "I live in Lyon.", "My dog is called Rex.", "I work as a baker.",
             "I like green tea.", "My sister is Mia."]
    for fact in facts:
        reply = guard.chat(fact, session="ada", temperature=0.0)
        assert reply.usage.input_tokens <= 160
    assert reply.messages[0]["content"].startswith(SUMMARY_HEADER)
    summary = reply.messages[0]["content"].removeprefix(SUMMARY_HEADER)
    assert summary.strip() and guard.tokenizer.count(summary) <= 32
    rows = [row for row in guard.ledger.records() if row["tags"] == "summary"]
    assert rows and all(0 < row["output_tokens"] <= 32 for row in rows)
    assert TailOnly().fit(reply.messages, 160, guard.tokenizer) == reply.messages  # it fits as sent
    guard.end_session("ada")  # the runner is shared by the test session: give its KV blocks back
