"""Malformed input and bad options: one tokenguard error each, which is also the
TypeError/ValueError Python's conventions expect, raised before anything is spent."""

from __future__ import annotations

import asyncio

import pytest

import tokenguard as tg
from tokenguard import Budget, ConfigError, Guard, InvalidRequest, TokenGuardError

MALFORMED = [
    (None, "got NoneType"),
    ({}, "wrap one message in a list"),
    ({"role": "user", "content": "hi"}, "wrap one message in a list"),
    ([None], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0 has no 'role'"),
    ([{"role": "user", "content": "ok"}, {"role": "", "content": "x"}], "message 1 has no 'role'"),
    ([{"role": "user", "content": 42}], "content of type int"),
    ([{"role": "user", "content": {"text": "hi"}}], "content of type dict"),
    ([{"role": "user", "content": ["plain string part"]}], "content of type list"),
    ([], "at least one message"),
    (42, "got int"),
    (b"bytes", "got bytes"),
]


def _guard(budget: Budget | None = None) -> tuple[Guard, list]:
    called: list = []

    def backend(messages, *, max_tokens):
        called.append(messages)
        return "ok"

    return Guard(backend, model="gpt-4o", budget=budget), called


@pytest.mark.parametrize(("bad", "message"), MALFORMED)
def test_malformed_messages_raise_invalid_request_before_the_backend(bad, message):
    budget = Budget(tokens=1_000)
    guard, called = _guard(budget)
    guard.complete("a good call first")
    for attempt in (
        lambda: guard.complete(bad),
        lambda: guard.stream(bad),
        lambda: asyncio.run(guard.acomplete(bad)),
    ):
        with pytest.raises(InvalidRequest, match=message) as caught:
            attempt()
        assert isinstance(caught.value, TokenGuardError)
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
    assert len(called) == 1
    assert len(guard.ledger) == 1  # the good call's row is kept; nothing was started
    assert budget.spent()["reserved_tokens"] == 0


def test_content_parts_and_assistant_tool_calls_are_accepted():
    guard, called = _guard()
    guard.complete([
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "and?"},
    ])
    assert len(called) == 1


@pytest.mark.parametrize("bad", [None, 5, ["a list"]])
def test_chat_rejects_a_message_that_is_neither_text_nor_a_message(bad):
    guard, called = _guard()
    with pytest.raises(InvalidRequest):
        guard.chat(bad, session="s")
    assert not called and len(guard.history) == 0


@pytest.mark.parametrize("bad", ["ten", -1, 2.5, True])
def test_max_tokens_must_be_a_count(bad):
    guard, called = _guard()
    with pytest.raises(InvalidRequest, match="max_tokens"):
        guard.complete("hi", max_tokens=bad)
    assert not called


@pytest.mark.parametrize(("option", "value", "message"), [
    ("max_output_tokens", float("nan"), "max_output_tokens must be a whole number >= 0"),
    ("max_output_tokens", 2.5, "max_output_tokens must be a whole number >= 0"),
    ("max_output_tokens", None, "max_output_tokens must be a whole number >= 0"),
    ("max_input_tokens", "10", "max_input_tokens must be a whole number >= 0"),
    ("max_context_tokens", float("nan"), "max_context_tokens must be a whole number >= 1"),
    ("max_context_tokens", 0, "max_context_tokens must be a whole number >= 1"),
    ("timeout", float("nan"), "timeout must be a number of seconds > 0"),
    ("session_ttl_s", float("nan"), "ttl_s must be a number of seconds > 0"),
    ("session_ttl_s", float("inf"), "ttl_s must be a number of seconds > 0"),
])
def test_numeric_options_that_are_no_valid_number_are_refused_at_construction(option, value, message):
    # NaN slips past `value < 0` (and then disables the limit); 2.5 or None failed on every call.
    with pytest.raises(ConfigError, match=message):
        Guard(lambda m, max_tokens: "", model="gpt-4o", **{option: value})


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="backend must be"):
        Guard(42)
    with pytest.raises(ConfigError, match="max_output_tokens"):
        Guard(lambda m: "", model="gpt-4o", max_output_tokens=-1)
    with pytest.raises(ConfigError, match="max_input_tokens"):
        Guard(lambda m: "", model="gpt-4o", max_input_tokens=-1)
    with pytest.raises(ConfigError, match="pass model="):
        Guard(lambda m: "")  # a function's model cannot be guessed
    with pytest.raises(ConfigError, match="takes no backend"):
        tg.guard(backend=lambda m: "")
    with pytest.raises(ConfigError, match="a ledger store is None, a path or a LedgerStore"):
        tg.Ledger(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="store must be None, a path or a BudgetStore"):
        Budget(tokens=5, store=42)  # type: ignore[arg-type]


def test_bad_arguments_below_the_guard_are_tokenguard_errors_too():
    from tokenguard.runner import SamplingParams

    tok = tg.get_tokenizer("gpt-4o")
    for attempt, message in (
        (lambda: tok.count(None), "expected text as str"),
        (lambda: tok.count_until("text", -1), "limit must be >= 0"),
        (lambda: tok.truncate("text", 3, side="middle"), "side must be"),
        (lambda: tok.count_messages(None), "messages must be a list"),
        (lambda: SamplingParams(temperature=-1.0), "temperature must be a finite number >= 0"),
        (lambda: SamplingParams(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (lambda: SamplingParams(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (lambda: SamplingParams(repetition_penalty=float("nan")), "repetition_penalty must be a finite number > 0"),
        (lambda: SamplingParams(top_p=float("nan")), "top_p must be in"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            attempt()


@pytest.mark.parametrize("run", ["sync", "async"])
def test_a_prepared_call_runs_once(run):
    # Its holds are keyed by its request_id: a second run held twice and released once.
    budget = Budget(tokens=1000)
    guard = Guard(lambda messages, max_tokens: iter(["a ", "b ", "c "]), model="gpt-4o-mini", budget=budget,
                  max_output_tokens=50)
    call = guard.prepare("hi")
    if run == "sync":
        first = guard.open_stream(call)
        with pytest.raises(InvalidRequest, match=f"call {call.request_id} has run already"):
            guard.open_stream(call)
        first.read()
    else:
        async def twice() -> None:
            await guard.open_astream(call).aread()
            with pytest.raises(InvalidRequest, match="has run already"):
                await guard.open_astream(call).aread()

        asyncio.run(twice())
    [row] = guard.ledger.records()
    spent = budget.spent()
    assert spent["tokens"] == row["input_tokens"] + row["output_tokens"] and spent["reserved_tokens"] == 0


@pytest.mark.parametrize(("option", "value"), [("session", ""), ("user", ""), ("user", 42), ("session", ["s"])])
def test_user_and_session_are_non_empty_strings(option, value):
    # An empty session would be one chat history that every caller sending "" shares.
    guard, called = _guard()
    with pytest.raises(InvalidRequest, match=f"{option} must be a non-empty str or None"):
        guard.complete("hi", **{option: value})
    with pytest.raises(InvalidRequest, match=f"{option} must be a non-empty str or None"):
        guard.chat("hi", **{"session": "s", option: value})
    assert not called and guard.history.get("") == []


@pytest.mark.parametrize("option", ["user", "session"])
def test_user_and_session_must_be_text(option):
    # Half a UTF-16 pair: no ledger, budget or cache store could file the call under it.
    guard, called = _guard()
    with pytest.raises(InvalidRequest, match=f"{option} holds an unpaired UTF-16 surrogate"):
        guard.complete("hi", **{option: "caf\udce9"})
    assert not called
