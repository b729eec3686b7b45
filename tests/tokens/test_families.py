"""Properties every tokenizer family keeps, checked on real tokenizer data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenguard as tg

FAMILIES = ["o200k", "cl100k", "sentencepiece", "tokenizer_json", "gguf"]


def _load(request: pytest.FixtureRequest, family: str) -> tg.Tokenizer:
    source = {
        "o200k": lambda: "gpt-4o",
        "cl100k": lambda: "gpt-4",
        "sentencepiece": lambda: request.getfixturevalue("sentencepiece_model"),
        "tokenizer_json": lambda: request.getfixturevalue("tokenizer_json"),
        "gguf": lambda: request.getfixturevalue("default_gguf"),
    }[family]()
    return tg.get_tokenizer(source)


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizer(request: pytest.FixtureRequest) -> tg.Tokenizer:
    return _load(request, request.param)


# WordPiece (the tokenizer.json family here) lowercases and drops spacing by design.
@pytest.fixture(scope="module", params=[f for f in FAMILIES if f != "tokenizer_json"])
def lossless_tokenizer(request: pytest.FixtureRequest) -> tg.Tokenizer:
    return _load(request, request.param)


SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "chinese": "人工智能正在改变世界，我们需要精确地计算令牌。",
    "japanese": "日本語のテキストをトークンに分割します。カタカナも。",
    "emoji": "Deploy 🚀🔥 then celebrate 🎉👩‍💻",
    "code": "def f(x: int) -> int:\n    return x ** 2  # squares\n",
    "whitespace": "a  \t\n\n   b\r\n      c",
}

LOOKALIKES = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[CLS]", "[SEP]"]


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_script_is_counted(tokenizer: tg.Tokenizer, kind: str) -> None:
    text = SAMPLES[kind]
    ids = tokenizer.encode(text)
    assert tokenizer.count(text) == len(ids) > 0
    assert all(isinstance(i, int) for i in ids)


@pytest.mark.parametrize("kind", ["english", "chinese", "japanese", "emoji", "code"])
def test_lossless_families_round_trip(lossless_tokenizer: tg.Tokenizer, kind: str) -> None:
    tokenizer = lossless_tokenizer
    text = SAMPLES[kind]
    decoded = tokenizer.decode(tokenizer.encode(text))
    if isinstance(tokenizer, tg.SentencePieceTokenizer):
        decoded = decoded.lstrip()
    assert decoded == text


@pytest.mark.parametrize("lookalike", LOOKALIKES)
def test_special_token_text_is_plain_text(tokenizer: tg.Tokenizer, lookalike: str) -> None:
    ids = tokenizer.encode(f"hi {lookalike} there")
    control_ids = set(tokenizer.special_tokens.values())
    assert not control_ids & set(ids), f"{lookalike!r} became a control token"
    assert tokenizer.count(lookalike) >= 1


def test_lone_surrogate_counts_as_replacement_character(tokenizer: tg.Tokenizer) -> None:
    assert tokenizer.count("a\ud800b") == tokenizer.count("a\ufffdb")
    assert tokenizer.count_until("\udfff" * 10, 100) == tokenizer.count("\ufffd" * 10)


def test_non_text_is_a_type_error(tokenizer: tg.Tokenizer) -> None:
    with pytest.raises(TypeError, match="str"):
        tokenizer.count(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        tokenizer.count_until("x", -1)


texts = st.text(alphabet=st.sampled_from(list("ab cd\n\t.,!?'1234人工智能日本🤖é<|>s/")), max_size=400)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, limit=st.integers(min_value=0, max_value=40))
def test_count_until_is_exact_up_to_the_limit(tokenizer: tg.Tokenizer, text: str, limit: int) -> None:
    exact = tokenizer.count(text)
    bounded = tokenizer.count_until(text, limit)
    if exact <= limit:
        assert bounded == exact
    else:
        assert bounded > limit


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, max_tokens=st.integers(min_value=0, max_value=30), side=st.sampled_from(["right", "left"]))
def test_truncate_keeps_the_longest_fitting_part(tokenizer: tg.Tokenizer, text: str, max_tokens: int,
                                                 side: str) -> None:
    _check_longest(tokenizer, text, max_tokens, side)


PROSE = (
    "Hello, World! The guard counts every field's text, and a prefix's count does not grow with its length "
    "everywhere: `benchmark` results, gpt-4o's tokenizer, 人工智能的发展, and calls with their results in their "
    "original order. Supercalifragilistic words, URLs like https://example.com/a/long/path?query=1, and numbers "
    "such as 1234567.89 all end mid-word somewhere. "
)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncate_keeps_the_longest_fitting_part_of_prose(tokenizer: tg.Tokenizer, side: str) -> None:
    for max_tokens in range(1, 60):
        _check_longest(tokenizer, PROSE, max_tokens, side)


def _check_longest(tokenizer: tg.Tokenizer, text: str, max_tokens: int, side: str) -> None:
    """The cut fits, and no longer part within 30 characters does (a count may fall
    again as a word completes: "Hello, Worl" is 4 tokens, "Hello, World" 3)."""
    cut = tokenizer.truncate(text, max_tokens, side=side)
    assert tokenizer.count(cut) <= max_tokens
    assert text.startswith(cut) if side == "right" else text.endswith(cut)
    for n in range(len(cut) + 1, min(len(text), len(cut) + 30) + 1):
        longer = text[:n] if side == "right" else text[len(text) - n :]
        assert tokenizer.count(longer) > max_tokens, (max_tokens, side, cut, longer)


def test_count_until_rejects_a_huge_input_without_reading_it(tokenizer: tg.Tokenizer, read_probe) -> None:
    huge = read_probe("Mixed English text and 中文内容 for the cap. " * 250_000)  # ~10 MB
    assert tokenizer.count_until(huge, 4000) > 4000
    assert 0 < huge.furthest <= 16 * 4001  # a head of the text, bounded by the limit


def test_truncating_a_long_run_encodes_no_window_of_it(tokenizer: tg.Tokenizer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Counting compresses runs; encoding does not: the cut's refinement encoded the whole
    # window of a 20 MB run of spaces (20 s), where its count takes milliseconds.
    encoded: list[int] = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: encoded.append(len(text)) or encode(text))
    cut = tokenizer.truncate(" " * 2_000_000 + "end", 1000)
    assert tokenizer.count(cut) <= 1000 and max(encoded, default=0) <= 32 * 1001


def test_truncate_never_splits_a_character(tokenizer: tg.Tokenizer) -> None:
    text = "🤖人工智能🎉" * 20
    for n in range(0, 12):
        for side in ("right", "left"):
            cut = tokenizer.truncate(text, n, side=side)
            assert "\ufffd" not in cut
            assert cut in text


def test_unknown_name_lists_what_is_accepted() -> None:
    with pytest.raises(tg.UnknownTokenizer, match=r"OpenAI model name.*o200k_base.*SentencePiece"):
        tg.get_tokenizer("no-such-model-xyz")


def test_openai_model_on_an_encoding_not_shipped_offline() -> None:
    with pytest.raises(tg.UnknownTokenizer, match="r50k_base"):
        tg.get_tokenizer("davinci")


def test_a_non_tokenizer_file_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(tg.UnknownTokenizer, match="SentencePiece"):
        tg.get_tokenizer(junk)
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"nope")
    with pytest.raises(tg.UnknownTokenizer, match="GGUF"):
        tg.get_tokenizer(fake)


def test_decoding_an_id_outside_the_vocabulary_is_an_invalid_request(tokenizer: tg.Tokenizer) -> None:
    # tiktoken raised KeyError or OverflowError, the Hugging Face families returned "".
    for ids in ([tokenizer.vocab_size], [-1], ["a"], [True], "abc"):
        with pytest.raises(tg.InvalidRequest, match="token id"):
            tokenizer.decode(ids)  # type: ignore[arg-type]
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"
