"""Hostile text through every tokens entry point and through the Guard.

Three properties, on every tokenizer family (tiktoken o200k and cl100k, the bundled
SmolLM2 GGUF vocabulary, a SentencePiece model): only ``TokenGuardError`` subclasses
come out; ``count_until`` is exact when the text is within its limit; and its work is
bounded by the limit for every input class, measured as the characters handed to the
family's native encoder (no wall-clock thresholds).
"""

from __future__ import annotations

from typing import Any

import pytest
from hostile_inputs import FAMILIES, LOOKALIKES, RUN_UNITS, encoder_reads, load_family, warm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenguard as tg
from tokenguard.tokens import TemplatedTokenizer
from tokenguard.tokens.runs import MIN_RUN


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizer(request: pytest.FixtureRequest) -> tg.Tokenizer:
    return warm(load_family(request, request.param))


SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

odd_chars = st.sampled_from(
    ["\x00", "\u0301", "\u200f", "\u202e", "\ufeff", "\ud800", "\udfff", "\r", "\n", "\t", " ", "人", "😀", "\u3000"]
)
# Anything Unicode holds, lone surrogates included, plus the characters above more often.
any_text = st.text(st.one_of(st.characters(exclude_categories=()), odd_chars), max_size=40)
runs = st.builds(lambda unit, n: unit * n, st.sampled_from(sorted(RUN_UNITS.values())), st.integers(0, 3 * MIN_RUN))
hostile_texts = st.lists(st.one_of(any_text, runs, st.sampled_from(LOOKALIKES)), max_size=5).map("".join)


@SETTINGS
@given(text=hostile_texts, limit=st.integers(0, 300))
def test_counts_are_exact_and_count_until_is_exact_within_its_limit(
    tokenizer: tg.Tokenizer, text: str, limit: int
) -> None:
    exact = len(tokenizer.encode(text))  # the native tokenizer on the whole text
    assert tokenizer.count(text) == exact  # runs counted by the pumping rule, not tokenized
    bounded = tokenizer.count_until(text, limit)
    if exact <= limit:
        assert bounded == exact
    else:
        assert bounded > limit
    cut = tokenizer.truncate(text, limit)
    assert text.startswith(cut)
    assert tokenizer.count(cut) <= limit


# Large runs of one class: up to 2 MB of one character (or a short unit).
@SETTINGS
@given(unit=st.sampled_from(sorted(RUN_UNITS.values())), n=st.integers(0, 2_000_000), limit=st.integers(0, 4000))
def test_count_until_reads_what_the_limit_allows_on_every_class(
    tokenizer: tg.Tokenizer, unit: str, n: int, limit: int
) -> None:
    text = unit * (n // len(unit))
    with encoder_reads(tokenizer) as reads:
        bounded = tokenizer.count_until(text, limit)
    # The first window is 8 characters per allowed token and doubles at most twice
    # before it settles; long runs reach the encoder shortened to under MIN_RUN. Text
    # that never settles (0 tokens: SmolLM2 drops 0x04) doubles to its end: one
    # shortened read per doubling.
    assert reads[0] <= 32 * (limit + 1) + (MIN_RUN + 64) * len(text).bit_length()
    bound = tokenizer._max_token_chars
    kept = len(text) - sum(map(text.count, tokenizer._dropped_chars))  # the characters tokens stand for
    if bound is not None and kept > bound * (limit + 1):
        assert bounded > limit  # no token stands for more than `bound` characters


@pytest.mark.parametrize("kind", sorted(RUN_UNITS))
def test_a_megabyte_of_each_class_costs_a_bounded_read(tokenizer: tg.Tokenizer, kind: str, read_probe) -> None:
    text = read_probe(RUN_UNITS[kind] * (1_000_000 // len(RUN_UNITS[kind])))
    with encoder_reads(tokenizer) as reads:
        bounded = tokenizer.count_until(text, 4000)
    assert reads[0] <= 32 * 4001 + 4 * MIN_RUN
    if bounded <= 4000:  # a text the tokenizer drops (SmolLM2 has no token for 0x04)
        assert bounded == tokenizer.count(str(text)) == 0
    else:
        assert text.furthest <= 256 * 4001  # only a head of the text is ever sliced


def test_count_tokens_counts_hostile_text(tokenizer: tg.Tokenizer) -> None:
    text = " " * 700_000 + "<|endoftext|>\ud800\x00\u200f\ufeff" + "-" * 5000 + "人" * 3
    expected = tokenizer.count(text)
    assert tokenizer.count_until(text, expected) == expected
    if isinstance(tokenizer, tg.TiktokenTokenizer):
        assert tg.count_tokens(text, model=tokenizer.name) == expected


# -- messages -------------------------------------------------------------------------

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), hostile_texts, st.binary(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["type", "text", "function", "name", "arguments", "x"]), inner, max_size=3),
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", 3]), "text": inner}),
    ),
    max_leaves=6,
)
messages = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), values)},
    optional={"content": values, "name": values, "tool_calls": values, "tool_call_id": values},
)
well_formed = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": hostile_texts}),
    min_size=1,
    max_size=3,
)
message_lists = st.one_of(
    well_formed,
    st.lists(st.one_of(messages, values), max_size=4),
    values,
    st.dictionaries(st.text(max_size=4), values, max_size=2),
)


@SETTINGS
@given(payload=message_lists)
def test_count_messages_raises_only_tokenguard_errors(tokenizer: tg.Tokenizer, payload: Any) -> None:
    try:
        counted = tokenizer.count_messages(payload)
    except tg.TokenGuardError as error:
        assert str(error)  # says what is wrong
    else:
        assert isinstance(counted, int) and counted >= 0
        if isinstance(tokenizer, TemplatedTokenizer):  # counted, not encoded: the same number
            assert counted == len(tokenizer.encode_chat(payload))


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.count(None),
        lambda t: t.count(b"bytes"),
        lambda t: t.count_until("x", -1),
        lambda t: t.count_until("x", None),
        lambda t: t.count_until("x", 1.5),
        lambda t: t.count_until("x", True),
        lambda t: t.truncate("x", -3),
        lambda t: t.truncate("x", 3, side="middle"),
        lambda t: t.count_messages(None),
        lambda t: t.count_messages("hello"),
        lambda t: t.count_messages([{"content": "no role"}]),
        lambda t: t.count_messages([None]),
    ],
)
def test_malformed_calls_are_invalid_requests(tokenizer: tg.Tokenizer, call) -> None:
    with pytest.raises(tg.InvalidRequest) as raised:
        call(tokenizer)
    assert str(raised.value)


@pytest.mark.parametrize("name", ["\x00", "nul\x00in/the/name.model", "~no-such-user-xyz/x.model", "a" * 5000, ""])
def test_odd_tokenizer_names_are_unknown_tokenizers(name: str) -> None:
    with pytest.raises(tg.UnknownTokenizer):
        tg.get_tokenizer(name)


# -- through the Guard -----------------------------------------------------------------


@pytest.fixture(scope="module")
def guard() -> tg.Guard:
    return tg.Guard(lambda messages, max_tokens: "ok", model="gpt-4o", max_input_tokens=2000)


@pytest.mark.parametrize("kind", sorted(RUN_UNITS))
def test_guard_refuses_a_megabyte_of_each_class_with_bounded_work(guard: tg.Guard, kind: str) -> None:
    unit = RUN_UNITS[kind]
    tokenizer = warm(tg.get_tokenizer("gpt-4o"))
    with encoder_reads(tokenizer) as reads, pytest.raises(tg.InputTooLong):
        guard.complete(unit * (1_000_000 // len(unit)))
    assert reads[0] <= 32 * 2001 + 4 * MIN_RUN
    assert guard.complete(unit * 3).text == "ok"


@settings(deadline=None, max_examples=60)
@given(text=hostile_texts)
def test_guard_answers_or_refuses_hostile_text(text: str) -> None:
    guard = tg.Guard(lambda messages, max_tokens: "ok", model="gpt-4o", max_input_tokens=2000)
    try:
        reply = guard.complete(text)
    except tg.InputTooLong:
        assert tg.get_tokenizer("gpt-4o").count(text) > 2000 - 10  # the prompt's framing counts too
    else:
        assert reply.text == "ok"


@pytest.mark.parametrize(
    "payload",
    [None, {}, [None], [{"role": 1}], [], b"bytes", 7, [{"role": "user", "content": 5}], [{"role": "user"}]],
)
def test_guard_rejects_malformed_requests(guard: tg.Guard, payload: Any) -> None:
    with pytest.raises(tg.InvalidRequest) as raised:
        guard.complete(payload)
    assert str(raised.value)
