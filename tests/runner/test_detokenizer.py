"""Incremental detokenization and stop strings with the bundled model's real tokenizer."""

from __future__ import annotations

import pytest

from tokenguard.runner.detokenizer import IncrementalDetokenizer, StopStrings


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from tokenguard.tokens import get_tokenizer

    return get_tokenizer(str(default_gguf))


TEXTS = ["Hello, world!", "naïve café 人工智能 🌊🚀 done", "  spaces\n\nand\ttabs ", "数字 12345 ✓"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Say:"))
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer.encode("🌊")
    assert len(ids) > 1  # the emoji spans several byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🌊"


def test_a_reply_cut_inside_a_character_ends_before_it(tokenizer):
    # Cut at max_tokens inside "🌊": its first bytes are no text (they decode as U+FFFD).
    ids = tokenizer.encode("Waves 🌊")
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids[:-1]] + [detok.flush()]
    assert "".join(pieces) == "Waves "


def test_stop_strings_find_and_hold_back():
    stops = StopStrings(["END", "\n\n"])
    assert stops.find("abc EN", 0) == -1
    assert stops.safe_length("abc EN") == 4  # "EN" may become "END"
    assert stops.find("abc END more", 4) == 4
    assert stops.find("x\n\ny", 2) == 1  # a match that straddles the previous text
    assert stops.safe_length("abc\n") == 3
    assert StopStrings([]).safe_length("abc") == 3
