"""The hand-written question pairs for evaluating the semantic cache: schema, uniqueness and coverage.

Reads the JSON Lines file only; no model is loaded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

PAIRS = Path(__file__).resolve().parent.parent / "data" / "cache" / "pairs.jsonl"

FIELDS = {"id", "lang", "label", "kind", "a", "b"}
LANGS = {"en", "zh"}
LABELS = {"paraphrase", "near_miss"}
KINDS = {
    "paraphrase": {
        "abbreviation",
        "ellipsis",
        "filler",
        "measure_word",
        "number_format",
        "particle",
        "politeness",
        "question_imperative",
        "register",
        "restructure",
        "spelling",
        "synonym",
        "typo",
        "voice",
        "word_order",
    },
    "near_miss": {
        "action",
        "attribute",
        "audience",
        "comparative",
        "conjunction",
        "currency",
        "direction",
        "entity",
        "format",
        "language",
        "modal",
        "negation",
        "number",
        "object",
        "person",
        "quantity",
        "question_word",
        "tense",
        "time",
        "topic",
        "unit",
    },
}
MIN_PER_LANG_LABEL = 120
ID_RE = re.compile(r"^(en|zh)-(p|n)-\d{3}$")
CJK_RE = re.compile(r"[\u4e00-\u9fff]")


def _load() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return _load()


def test_file_is_utf8_json_lines_with_characters_not_escapes():
    raw = PAIRS.read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert all(line.strip() for line in lines), "blank line in the file"
    assert "\\u" not in text, "write with ensure_ascii=False"
    for number, line in enumerate(lines, 1):
        assert isinstance(json.loads(line), dict), f"line {number} is not a JSON object"


def test_schema_and_allowed_values(rows):
    for row in rows:
        assert set(row) == FIELDS, row
        assert all(isinstance(row[field], str) and row[field] for field in FIELDS), row
        assert row["lang"] in LANGS, row
        assert row["label"] in LABELS, row
        assert row["kind"] in KINDS[row["label"]], row
        match = ID_RE.match(row["id"])
        assert match, row
        assert match.group(1) == row["lang"], row
        assert match.group(2) == ("p" if row["label"] == "paraphrase" else "n"), row
        for side in ("a", "b"):
            assert row[side] == row[side].strip(), row
            assert "\n" not in row[side], row


def test_ids_unique_and_sorted(rows):
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids)


def test_pairs_unique_and_sides_differ(rows):
    for row in rows:
        assert row["a"] != row["b"], row
    pairs = Counter(frozenset((row["a"], row["b"])) for row in rows)
    repeated = [sorted(pair) for pair, count in pairs.items() if count > 1]
    assert repeated == []


def test_enough_pairs_per_language_and_label(rows):
    counts = Counter((row["lang"], row["label"]) for row in rows)
    for lang in LANGS:
        for label in LABELS:
            assert counts[lang, label] >= MIN_PER_LANG_LABEL, (lang, label, counts[lang, label])


def test_chinese_sides_contain_cjk(rows):
    for row in rows:
        if row["lang"] == "zh":
            assert CJK_RE.search(row["a"]) and CJK_RE.search(row["b"]), row


def test_english_sides_are_ascii_ish(rows):
    for row in rows:
        if row["lang"] == "en":
            for side in (row["a"], row["b"]):
                assert not CJK_RE.search(side), row
                non_ascii = sum(not ch.isascii() for ch in side)
                assert non_ascii <= max(1, len(side) // 20), row
