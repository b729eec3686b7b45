"""The details a question's answer depends on, and whether two questions share them.

Embeddings place "capital of France" next to "capital of Germany", "5 km" next to
"50 km" and "km to miles" next to "miles to km": measured on the labelled set in
``tests/data/cache/pairs.jsonl`` (hand-written English and Chinese paraphrases and near
misses), the bundled all-MiniLM-L6-v2 gives near misses the same similarities as
paraphrases, and Chinese near misses often identical embeddings (the model reads few
Chinese characters). So a semantic hit must also pass this check:

- the same numbers (``5``, ``5.0``, ``five``, ``五``, ``4th`` are read as numbers; a
  sign, a percent and every digit of a long one count);
- the same content words, after case, plurals and a list of filler words (articles,
  "is", "do", politeness: "could you please tell me") are set aside, a one-letter typo
  in a word of five letters or more forgiven; for Chinese, the same characters outside
  a list of particles and polite phrases; words of other scripts (Cyrillic, Greek,
  Arabic, kana, Hangul, ...) are all details, none filler;
- the same operators and symbols: ``6 + 3`` is not ``6 - 3``, ``7 < 5`` not ``7 > 5``,
  ``100$`` not ``100€`` (every math, currency or other symbol, and ``-``, ``*``, ``/``
  standing alone);
- the same question word (who, when, where, why, how), person (my, your, his, her),
  tense (was, will) and modal (should, must): "When was it built?" is not "Where was
  it built?", "What is my name?" is not "What is your name?";
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
a an the of in on at by for with about as onto then is are be been being am do does done doing have has having
it its this that these those there here what which whats please pls kindly thanks thank thx advance hello hi hey
dear just maybe perhaps really actually basically quick quickly tell let know want wanted need needed like
wondering wonder help explain show give get got any some thing things way ways something anything so very much many
also too quite bit little yes ok okay
"""
_FILLER_EN = frozenset(_FILLER_EN_WORDS.split())
# Words that change the answer wherever they stand, compared as a set: the question
# asked, whose it is, when, and how sure. "can" and "could" ask the same.
_FORM_GROUPS = {
    "who": "who whom whose", "when": "when", "where": "where wheres", "why": "why", "how": "how hows",
    "1": "i me my mine myself", "1p": "we us our ours ourselves", "2": "you your yours yourself yourselves",
    "3m": "he him his himself", "3f": "she her hers herself", "3p": "they them their theirs themselves",
    "past": "was were did had", "future": "will shall", "should": "should ought", "must": "must",
    "can": "can could", "may": "may might", "would": "would",
}
_FORMS_EN = {word: form for form, words in _FORM_GROUPS.items() for word in words.split()}
# Verbs that make "could you ..." a request rather than a question about "you".
_REQUESTS = (r"(?:tell|explain|show|give|help|describe|list|let|recommend|suggest|write|provide|share|say|"
             r"check|find|summari[sz]e|translate|calculate|convert|compare|define|name)\b")
# Polite frames around a question, set aside before anything is read: "could you" only
# at a sentence's start and before a request ("Can you swim?" asks about you).
_POLITE_EN = re.compile(
    r"(?:(?:^|(?<=[.!?,;:]\s))(?:could|can|would|will)\s+you\s+(?:please\s+|kindly\s+)*(?=" + _REQUESTS + r")"
    r"|\b(?:please\s+)?(?:tell|show|let)\s+me(?:\s+know)?\b"
    r"|\bi\s+(?:would|'d)\s+like\s+to\s+know\b|\bi\s+(?:want|need)\s+to\s+know\b"
    r"|\bi\s+(?:was\s+|am\s+|'m\s+)?wondering\b|\bdo\s+you\s+know\b)",
    re.IGNORECASE,
)
_CONTRACTIONS = [
    (re.compile(pattern, re.IGNORECASE), replacement)
    for pattern, replacement in (
        (r"\bcan't\b", "can not"), (r"\bwon't\b", "will not"), (r"\bshan't\b", "shall not"), (r"n't\b", " not"),
        (r"\b(what|where|who|how|when|why|it|that|there|here|he|she)'s\b", r"\1 is"),
        (r"'re\b", " are"), (r"'m\b", " am"), (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"),
    )
]
# Particles, polite and question words that do not change the answer. 了, 过 and 要 stay
# details (they mark tense), as do 把, 被, 给, 让, 和 and 或.
_FILLER_ZH = frozenset("的吗呢吧啊呀嘛么一下是什样哪个些儿它们想能可以会帮忙麻烦谢着这那有就都也还在用说")
_POLITE_ZH = re.compile(
    r"(?:你|您)好|请问|请(?:你|您)|(?:^|(?<=[\s，。！？,.!?]))请|(?:你|您)?(?:能|可以|能不能)?告诉我|我想知道|我想问"
    r"|麻烦(?:你|您)?|帮我"
)
_QUESTIONS_ZH = {
    "为什么": "why", "为何": "why", "什么时候": "when", "何时": "when", "几时": "when",
    "哪里": "where", "哪儿": "where", "怎么": "how", "怎样": "how", "如何": "how", "谁": "who",
}
_QUESTION_ZH = re.compile("|".join(sorted(_QUESTIONS_ZH, key=len, reverse=True)))
_PERSONS_ZH = {"我": "1", "你": "2", "您": "2", "他": "3m", "她": "3f"}
# A number; a Chinese character; a word of any other script (a letter, then letters,
# digits and +#'-); or one other character that is neither space nor a word's.
_TOKEN = re.compile(
    r"(?:(?<![A-Za-z0-9_.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:st|nd|rd|th)?"
    r"|[\u3400-\u9fff]|(?![\u3400-\u9fff])[^\W\d_](?:(?![\u3400-\u9fff])[\w+#'-])*|[^\w\s]"
)
# Punctuation (by Unicode's categories) that is an operator when it stands alone.
_OPERATORS = frozenset("-*/%")
_ZH_NUMERAL = re.compile(r"[零〇一二两三四五六七八九十百千万]+")
_ZH_DIGITS = dict(zip("零〇一二两三四五六七八九", (0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9), strict=True))
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000}
_NUMBER_NAMES = "zero one two three four five six seven eight nine ten eleven twelve"
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_NUMBER_NAMES.split())}
_NUMBER_WORDS["percent"] = "%"


@dataclass(frozen=True, slots=True)
class Details:
    """A question's numbers (normalised), content words and characters, the order in
    which they first appear, and its forms (question word, person, tense, modal)."""

    numbers: tuple[str, ...]
    words: frozenset[str]
    order: tuple[str, ...]
    forms: frozenset[str]

    @classmethod
    def of(cls, text: str) -> Details:
        text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2212", "-")  # minus sign
        for contraction, expanded in _CONTRACTIONS:
            text = contraction.sub(expanded, text)
        text = _POLITE_ZH.sub(" ", _POLITE_EN.sub(" ", text))
        forms = {_QUESTIONS_ZH[phrase] for phrase in _QUESTION_ZH.findall(text)}
        text = _QUESTION_ZH.sub(" ", text)
        text = _ZH_NUMERAL.sub(lambda m: f" {_zh_number(m.group())} " if m.group() != "一" else " ", text)
        numbers: list[str] = []
        order: list[str] = []
        for token in _TOKEN.findall(text):
            form = _PERSONS_ZH.get(token) or _FORMS_EN.get(token.lower())
            if form is not None:
                forms.add(form)
                continue
            detail = _detail(token)
            if detail is None:
                continue
            if _is_number(detail):
                numbers.append(detail)
            order.append(detail)
        first_seen = tuple(dict.fromkeys(order))
        words = frozenset(d for d in first_seen if not _is_number(d))
        return cls(tuple(sorted(numbers)), words, first_seen, frozenset(forms))


def same_details(a: str, b: str) -> bool:
    """Whether questions ``a`` and ``b`` depend on the same details (see the module)."""
    da, db = Details.of(a), Details.of(b)
    if da.numbers != db.numbers or da.forms != db.forms:
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
    if _is_number(token):
        sign, digits = ("-", token[1:]) if token[0] == "-" else ("", token)
        whole, _, fraction = re.sub(r"(?:st|nd|rd|th)$", "", digits).replace(",", "").partition(".")
        fraction = fraction.rstrip("0")
        # Leading zeros stay: "007" and "02134" are codes, not 7 and 2134.
        return sign + whole + (f".{fraction}" if fraction else "")
    if "\u3400" <= token <= "\u9fff":
        return None if token in _FILLER_ZH else token
    if len(token) == 1 and not token.isalpha():  # punctuation or a symbol
        return token if token in _OPERATORS or unicodedata.category(token).startswith("S") else None
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


def _is_number(token: str) -> bool:
    return token[0].isdigit() or (token[0] == "-" and len(token) > 1)


def _zh_number(numeral: str) -> int | str:
    """A Chinese numeral's value: 三 -> 3, 十五 -> 15, 两百 -> 200, 三万五千 -> 35000; digits
    without units read digit by digit, as years are written: 二〇二四 -> 2024."""
    if not any(char in _ZH_UNITS for char in numeral):  # as text: an int of over 4,300 digits cannot be printed
        return "".join(str(_ZH_DIGITS[char]) for char in numeral).lstrip("0") or "0"
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
