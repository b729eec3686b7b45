"""The details a question's answer depends on, and whether two questions share them.

Embeddings place "capital of France" next to "capital of Germany", "5 km" next to
"50 km" and "km to miles" next to "miles to km": measured on the labelled set in
``tests/data/cache/pairs.jsonl`` (hand-written English and Chinese paraphrases and near
misses), the bundled all-MiniLM-L6-v2 gives near misses the same similarities as
paraphrases, and Chinese near misses often identical embeddings (the model reads few
Chinese characters). So a semantic hit must also pass this check:

- the same numbers (``5``, ``5.0``, ``five``, ``五``, ``4th`` are read as numbers);
- the same content words, after case, plurals and a list of filler words (articles,
  pronouns, question words, politeness: "could you please tell me") are set aside, a
  one-letter typo in a word of five letters or more forgiven; for Chinese, the same
  characters outside a list of particles and question words;
- the details in the same order: "km to miles" is not "miles to km", nor 上海飞纽约
  纽约飞上海.

It lets through rewordings that keep the details (politeness, filler, question or
imperative form, case, punctuation, plurals, small typos) and refuses synonyms and
reordered questions as well as near misses: a refused paraphrase costs one call, a
false hit serves a wrong answer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["Details", "same_details"]

_FILLER_EN_WORDS = """
a an the and or but if of in on at by for with about as onto then is are was were be been being am do does did
done doing have has had having will would shall should can could may might must i me my mine we us our you your
yours he him his she her it its they them their this that these those there here what which who whom whose when
where why how whats hows wheres whos please pls kindly thanks thank thx advance hello hi hey dear just maybe perhaps
really actually basically quick quickly tell let know want wanted need needed like wondering wonder help explain show
give get got any some thing things way ways something anything so very much many also too quite bit little yes ok
okay
"""
_FILLER_EN = frozenset(_FILLER_EN_WORDS.split())
# Particles, pronouns, question and politeness words. 了 and 要 stay details: they mark tense.
_FILLER_ZH = frozenset("的吗呢吧啊呀嘛么请问一下是什怎样如何哪里儿些个我你您他她它们想能可以会告诉"
                       "帮忙麻烦谢谢着过这那有就都也还在和与及或给把被让用说")
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*(?:st|nd|rd|th)?|[A-Za-z][A-Za-z0-9+#'-]*|[\u3400-\u9fff]")
_ZH_NUMERAL = re.compile(r"[零〇一二两三四五六七八九十百千万]+")
_ZH_DIGITS = dict(zip("零〇一二两三四五六七八九", (0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9), strict=True))
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000}
_NUMBER_NAMES = "zero one two three four five six seven eight nine ten eleven twelve"
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_NUMBER_NAMES.split())}


@dataclass(frozen=True, slots=True)
class Details:
    """A question's numbers (normalised), content words and characters, and the order
    in which they first appear."""

    numbers: tuple[str, ...]
    words: frozenset[str]
    order: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> Details:
        text = unicodedata.normalize("NFKC", text)
        text = _ZH_NUMERAL.sub(lambda m: f" {_zh_number(m.group())} " if m.group() != "一" else " ", text)
        numbers: list[str] = []
        order: list[str] = []
        for token in _TOKEN.findall(text):
            detail = _detail(token)
            if detail is None:
                continue
            if detail[0].isdigit():
                numbers.append(detail)
            order.append(detail)
        first_seen = tuple(dict.fromkeys(order))
        words = frozenset(d for d in first_seen if not d[0].isdigit())
        return cls(tuple(sorted(numbers)), words, first_seen)


def same_details(a: str, b: str) -> bool:
    """Whether questions ``a`` and ``b`` depend on the same details (see the module)."""
    da, db = Details.of(a), Details.of(b)
    if da.numbers != db.numbers:
        return False
    only_a, only_b = set(da.words - db.words), set(db.words - da.words)
    for word in list(only_a):
        typo = next((other for other in only_b if _one_typo_apart(word, other)), None)
        if typo is not None:
            only_a.discard(word)
            only_b.discard(typo)
    if only_a or only_b:
        return False
    shared = set(da.order) & set(db.order)  # typo pairs aside
    return [d for d in da.order if d in shared] == [d for d in db.order if d in shared]


def _detail(token: str) -> str | None:
    """A token as a detail (a number, a stemmed word, a character), or ``None`` for filler."""
    if token[0].isdigit():
        digits = re.sub(r"(?:st|nd|rd|th)$", "", token).replace(",", "")
        return str(float(digits)).removesuffix(".0") if digits.replace(".", "", 1).isdigit() else digits
    if "\u3400" <= token <= "\u9fff":
        return None if token in _FILLER_ZH else token
    word = token.lower().strip("'-").removesuffix("'s")
    if word in _NUMBER_WORDS and word != "one":  # "one" is as often "a" as it is 1
        return _NUMBER_WORDS[word]
    if word in _FILLER_EN:
        return None
    if token.isupper():  # an acronym: HTTPS is not the plural of HTTP
        return word
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _zh_number(numeral: str) -> int:
    """A Chinese numeral's value: 三 -> 3, 十五 -> 15, 两百 -> 200, 三万五千 -> 35000; digits
    without units read digit by digit, as years are written: 二〇二四 -> 2024."""
    if not any(char in _ZH_UNITS for char in numeral):
        return int("".join(str(_ZH_DIGITS[char]) for char in numeral))
    total = section = digit = 0
    for char in numeral:
        if char in _ZH_DIGITS:
            digit = _ZH_DIGITS[char]
        elif _ZH_UNITS[char] == 10_000:
            total += (section + digit) * 10_000
            section = digit = 0
        else:
            section += (digit or 1) * _ZH_UNITS[char]
            digit = 0
    return total + section + digit


def _one_typo_apart(a: str, b: str) -> bool:
    """One substitution, insertion or deletion apart, both words five letters or more."""
    if min(len(a), len(b)) < 5 or abs(len(a) - len(b)) > 1 or a[0].isdigit() or b[0].isdigit():
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))
