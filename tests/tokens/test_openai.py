"""tiktoken family: offline ranks, exact counts, OpenAI's message accounting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import tiktoken_ext.openai_public as openai_public
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenguard as tg
from tokenguard.tokens import openai as tg_openai

# The OpenAI cookbook's example conversation ("How to count tokens with tiktoken");
# the API reported 129 prompt tokens for gpt-4 / gpt-3.5-turbo and 124 for gpt-4o.
COOKBOOK_MESSAGES = [
    {"role": "system",
     "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user",
     "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-4.1", 124), ("o1", 124)],
)
def test_cookbook_message_counts(model: str, expected: int) -> None:
    assert tg.count_tokens(COOKBOOK_MESSAGES, model=model) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"), ("o1", "o200k_base"),
     ("gpt-4o-2024-08-06", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
     ("o200k_base", "o200k_base"), ("cl100k_base", "cl100k_base")],
)
def test_model_names_map_to_their_encoding(model: str, encoding: str) -> None:
    tokenizer = tg.get_tokenizer(model)
    assert isinstance(tokenizer, tg.TiktokenTokenizer)
    assert tokenizer.encoding.name == encoding


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_encodings_match_tiktokens_own_definitions(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ranks = tg_openai.load_ranks(name)

    def offline_ranks(url: str, expected_hash: str) -> dict[bytes, int]:
        assert expected_hash == tg_openai._ENCODINGS[name][0]
        return ranks

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", offline_ranks)
    reference = getattr(openai_public, name)()
    ours = tg_openai.get_encoding(name)
    assert ours._pat_str == reference["pat_str"]
    assert ours._special_tokens == reference["special_tokens"]
    assert ours._mergeable_ranks == reference["mergeable_ranks"]


def test_tampered_ranks_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _digest, pattern, special = tg_openai._ENCODINGS["cl100k_base"]
    monkeypatch.setitem(tg_openai._ENCODINGS, "cl100k_base", ("0" * 64, pattern, special))
    with pytest.raises(tg.TokenGuardError, match="checksum"):
        tg_openai.load_ranks("cl100k_base")


def test_counts_offline_with_sockets_blocked_and_empty_cache(tmp_path) -> None:
    script = textwrap.dedent(
        """
        import os, socket
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import tokenguard as tg
        assert tg.count_tokens("hello world", model="gpt-4o") == 2
        assert tg.count_tokens("hello world", model="gpt-4") == 2
        assert os.listdir(os.environ["TIKTOKEN_CACHE_DIR"]) == []
        print("offline ok")
        """
    )
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {"TIKTOKEN_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "offline ok" in result.stdout


@pytest.mark.parametrize(
    ("text", "o200k", "cl100k"),
    [("hello world", 2, 2), ("人工智能", 2, 5), ("", 0, 0)],
)
def test_known_counts(text: str, o200k: int, cl100k: int) -> None:
    assert tg.count_tokens(text, model="gpt-4o") == o200k
    assert tg.count_tokens(text, model="gpt-4") == cl100k


def test_message_fields_and_tool_calls_are_counted() -> None:
    tokenizer = tg.get_tokenizer("gpt-4o")
    base = [{"role": "user", "content": "hi"}]
    named = [{"role": "user", "content": "hi", "name": "bob"}]
    assert tokenizer.count_messages(named) == tokenizer.count_messages(base) + tokenizer.count("bob") + 1
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert tokenizer.count_messages([*base, call]) > tokenizer.count_messages(base) + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert tokenizer.count_messages(parts) == tokenizer.count_messages(base)
    # The legacy API's function_call counts as the tool call it is, not as the text of a dict.
    legacy = {"role": "assistant", "content": None, "function_call": call["tool_calls"][0]["function"]}
    assert tokenizer.count_messages([*base, legacy]) == tokenizer.count_messages([*base, call])


# The cookbook's tool example: the API reported 105 prompt tokens for gpt-4 and
# gpt-3.5-turbo, 101 for gpt-4o and gpt-4o-mini.
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]},
    }},
}}]
WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-4", 105), ("gpt-3.5-turbo", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)]
)
def test_cookbook_tool_counts(model: str, expected: int) -> None:
    assert tg.count_tokens(WEATHER_MESSAGES, model=model, tools=WEATHER_TOOLS) == expected


def test_the_legacy_functions_parameter_is_prompt_as_tools_are() -> None:
    functions = [tool["function"] for tool in WEATHER_TOOLS]

    def create(messages, max_tokens, tools=None, functions=None):
        return "It is sunny."

    guard = tg.Guard(create, model="gpt-4o")
    with_tools = guard.complete(WEATHER_MESSAGES, tools=WEATHER_TOOLS).usage.input_tokens
    assert guard.complete(WEATHER_MESSAGES, functions=functions).usage.input_tokens == with_tools == 101
    with pytest.raises(tg.InvalidRequest, match="functions must be a list"):
        guard.complete(WEATHER_MESSAGES, functions=functions[0])


def test_tools_with_referenced_definitions_count_what_they_refer_to() -> None:
    # pydantic writes nested models as $ref into $defs, optional ones as anyOf: they were not counted.
    tokenizer = tg.get_tokenizer("gpt-4o")
    address = {"type": "object", "properties": {"city": {"type": "string", "description": "The city, in full"}}}
    inline = [{"type": "function", "function": {"name": "order", "parameters": {"type": "object", "properties": {
        "ship_to": address, "bill_to": address}}}}]
    referenced = [{"type": "function", "function": {"name": "order", "parameters": {
        "type": "object", "$defs": {"Address": address}, "properties": {
            "ship_to": {"$ref": "#/$defs/Address"},
            "bill_to": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]}}}}}]
    assert tokenizer.count_tools(referenced) >= tokenizer.count_tools(inline) - 2  # the types differ: "" vs object
    looped = [{"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
        "properties": {"root": {"$ref": "#/$defs/Node"}}}}}]
    assert 0 < tokenizer.count_tools(looped) < 200  # a schema that refers to itself is counted to a depth


def test_an_input_cap_does_not_refuse_tools_their_count_fits() -> None:
    # The cap's bounded pre-check read every string of the schema ("object", titles,
    # patterns), which the accounting does not: a 44-token input was refused at 49.
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
        "code": {"type": "string", "title": "Code " * 30, "pattern": "^[A-Z]{3}-[0-9]{4}$" * 10,
                 "examples": ["ABC-1234"] * 20}}}}}]
    messages = [{"role": "user", "content": "hi"}]
    exact = tg.count_tokens(messages, model="gpt-4o", tools=tools)
    guard = tg.Guard(lambda messages, max_tokens, **kw: "ok", model="gpt-4o", max_input_tokens=exact)
    assert guard.complete(messages, tools=tools).usage.input_tokens == exact


def test_nested_tool_parameters_count_and_bad_tools_are_refused() -> None:
    tokenizer = tg.get_tokenizer("gpt-4o")
    flat = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "item": {"type": "object", "description": "The item"}}}}}]
    nested = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "item": {"type": "object", "description": "The item", "properties": {
            "sku": {"type": "string", "description": "Its stock-keeping unit"}}}}}}}]
    assert tokenizer.count_tools(nested) == tokenizer.count_tools(flat) + 3 + 3 + tokenizer.count(
        "sku:string:Its stock-keeping unit")
    assert tokenizer.count_tools(None) == tokenizer.count_tools([]) == 0
    for bad in ("add", [{"type": "function"}], [{"function": {"description": "no name"}}], {"function": {}}):
        with pytest.raises(tg.InvalidRequest, match="tools"):
            tokenizer.count_messages(WEATHER_MESSAGES, tools=bad)
    with pytest.raises(tg.InvalidRequest, match="message list"):
        tg.count_tokens("hi", model="gpt-4o", tools=WEATHER_TOOLS)


def test_absent_fields_and_dict_arguments_count_as_a_client_sends_them() -> None:
    tokenizer = tg.get_tokenizer("gpt-4o")
    hi = [{"role": "user", "content": "hi"}]
    assert tokenizer.count_messages([{**hi[0], "name": None}]) == tokenizer.count_messages(hi)
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    as_dict = {**call, "function": {"name": "f", "arguments": {"city": "Paris"}}}
    assert tokenizer.count_messages([{"role": "assistant", "content": None, "tool_calls": [as_dict]}]) == (
        tokenizer.count_messages([{"role": "assistant", "content": None, "tool_calls": [call]}]))


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": 1}], [{"role": 5, "content": "x"}], [{"role": "user", "content": b"x"}],
    [{"role": "user", "content": ["str"]}], [{"role": "user", "content": {"type": "text", "text": "hi"}}],
    [{"role": "user", "content": [{"type": "text", "text": None}]}], [{"role": "user", "content": None}],
])
@pytest.mark.parametrize("model", ["gpt-4o", "SmolLM2-135M-Instruct"])
def test_malformed_messages_are_invalid_requests_when_counted_too(messages, model) -> None:
    with pytest.raises(tg.InvalidRequest):  # as the guard refuses them
        tg.count_tokens(messages, model=model)


def test_non_text_parts_and_bad_messages_raise_clear_errors() -> None:
    tokenizer = tg.get_tokenizer("gpt-4o")
    with pytest.raises(tg.TokenGuardError, match="image_url"):
        tokenizer.count_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(TypeError, match="list of dicts"):
        tokenizer.count_messages("hello")
    with pytest.raises(tg.TokenGuardError, match="role"):
        tokenizer.count_messages([{"content": "no role"}])


def test_huge_whitespace_run_does_not_crash() -> None:
    # tiktoken's own regex engine panics on runs this long; they never reach it (see
    # tests/stress/test_no_panic.py for the silent stderr).
    tokenizer = tg.get_tokenizer("o200k_base")
    text = " " * 1_600_000 + "end"
    assert tokenizer.count(text) == len(tokenizer._encode_piecewise(text))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_piecewise_encoding_matches_tiktoken() -> None:
    # The regex-module split: the reference the no-panic tests compare against, and the
    # fallback of a TiktokenTokenizer built on an encoding with another pattern.
    tokenizer = tg.get_tokenizer("cl100k_base")
    text = "Hello,  world!\n\n  def f(x):\n\treturn x**2  # 12345 人工智能 🤖\r\n   "
    assert tokenizer._encode_piecewise(text) == tokenizer.encoding.encode_ordinary(text)


# -- long runs of blanks never reach tiktoken's regex ----------------------------------

RUN_UNITS = [" ", "\t", "\n", " \t", " \n", "\u3000"]
BEFORE = ["", "a", "!", "x\n", "人"]
AFTER = ["", "a", "!", "人", "1", "\n", "/"]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_blank_runs_split_exactly_on_every_small_case(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the threshold at 4, every run of 4 or more blanks takes the split path:
    # runs of 0..300 of each unit, before words, punctuation, CJK, digits, line breaks
    # and the end of the text, must encode exactly as plain tiktoken does.
    monkeypatch.setattr(tg_openai, "LONG_BLANKS", 4)
    tokenizer = tg.get_tokenizer(name)
    assert isinstance(tokenizer, tg.TiktokenTokenizer)
    plain = tokenizer.encoding.encode_ordinary
    for unit in RUN_UNITS:
        for k in range(301):
            run = (unit * k)[:k]
            for before in BEFORE:
                for after in AFTER:
                    text = before + run + after
                    assert tokenizer._encode_plain(text) == plain(text), (before, unit, k, after)


blanks_and_more = st.text(alphabet=st.sampled_from(list(" \t\n\r\u3000\xa0ab!/.1人😀'")), max_size=120)


@settings(max_examples=300, deadline=None)
@given(text=blanks_and_more)
def test_blank_runs_split_exactly_anywhere(text: str) -> None:
    for name in ("o200k_base", "cl100k_base"):
        tokenizer = tg.get_tokenizer(name)
        assert isinstance(tokenizer, tg.TiktokenTokenizer)
        old = tg_openai.LONG_BLANKS
        tg_openai.LONG_BLANKS = 2
        try:
            split = tokenizer._encode_plain(text)
        finally:
            tg_openai.LONG_BLANKS = old
        assert split == tokenizer.encoding.encode_ordinary(text)


def test_whitespace_is_what_tiktoken_patterns_call_whitespace() -> None:
    import regex

    everything = "".join(map(chr, range(0x110000)))
    expected = set(regex.findall(r"\s", everything))
    assert set(tg_openai.WHITESPACE) == expected
    assert len(tg_openai.WHITESPACE) == len(expected) == 25


def test_the_longest_token_bounds_count_until() -> None:
    for name in ("o200k_base", "cl100k_base"):
        tokenizer = tg.get_tokenizer(name)
        assert tokenizer._max_token_chars == 128
        assert tokenizer.count(" " * 128) == 1


@pytest.mark.parametrize(("encoding", "gap"), [("o200k_base", 199998), ("cl100k_base", 100256)])
def test_an_id_below_the_vocabulary_size_that_is_no_token_is_refused(encoding: str, gap: int) -> None:
    tokenizer = tg.get_tokenizer(encoding)
    with pytest.raises(tg.InvalidRequest, match=f"token id {gap} is no token of {encoding}"):
        tokenizer.decode([tokenizer.encode("hi")[0], gap])  # was tiktoken's bare KeyError
