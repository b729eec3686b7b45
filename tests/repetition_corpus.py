"""The labelled corpus that repetition stopping is measured on, shared by the tests
and ``benchmarks/bench_repetition.py``.

Natural texts must never be stopped: the hand-written ones in
``data/repetition/natural`` (songs with refrains, anaphora, numbered lists and
checklists, markdown tables, tables and rules drawn with box characters, similar lines
of code, JSON arrays of similar objects, CSV rows, Chinese with repeated particles) and
real texts from this machine: the standard library's own modules and the READMEs
(METADATA) of the installed packages. Left out of the natural set, and reported on their
own by the benchmark: the standard library's test fixtures and generated codec tables,
which repeat data on purpose (200 zeros, the same assertion pasted three times).

Looping texts must be stopped: loops the bundled model produced at greedy decoding
(``data/repetition/looping``, recorded by ``benchmarks/bench_repetition.py --record``)
and constructed loops of each kind in English, Chinese and code. Each knows where its
loop starts: the first character that repeats what came before.
"""

from __future__ import annotations

import importlib.metadata
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenguard import RepetitionStop

DATA = Path(__file__).parent / "data" / "repetition"
_REAL_TEXT_CHARS = 20_000  # the head of each real text, to keep the corpus quick


@dataclass(frozen=True)
class Sample:
    """One text of the corpus; ``loop_start`` is where its loop begins (a character
    index), ``None`` for natural text."""

    name: str
    text: str
    loop_start: int | None = None


def handwritten_natural() -> list[Sample]:
    return [Sample(f"natural/{p.name}", p.read_text(encoding="utf-8")) for p in sorted((DATA / "natural").iterdir())]


def stdlib_modules(*, fixtures: bool = False, limit: int | None = None) -> list[Sample]:
    """Standard library sources: its modules, or (``fixtures=True``) its test suite and
    codec tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")) + sorted(root.glob("*/*/*.py"))
    chosen = [
        p for p in paths
        if ("site-packages" not in p.parts)
        and (fixtures == ("test" in p.relative_to(root).parts or p.parent.name in ("encodings", "tests")))
    ]
    return [
        Sample(f"stdlib/{p.relative_to(root)}", p.read_text(encoding="utf-8", errors="replace")[:_REAL_TEXT_CHARS])
        for p in chosen[:limit]
    ]


def package_readmes(limit: int | None = None) -> list[Sample]:
    """The long descriptions (READMEs) of the installed distributions."""
    samples = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = (dist.read_text("METADATA") or "").partition("\n\n")[2]
        if body.strip():
            samples.append(Sample(f"readme/{dist.metadata['Name']}", body[:_REAL_TEXT_CHARS]))
    return samples[:limit]


def natural(*, real_limit: int | None = None) -> list[Sample]:
    """The natural set; ``real_limit`` caps how many texts of each real source."""
    return handwritten_natural() + stdlib_modules(limit=real_limit) + package_readmes(limit=real_limit)


_LOOP_CHARS = 2000  # a constructed loop runs on this long, as a real one runs to max_tokens


def _loop(name: str, prefix: str, pattern: str) -> Sample:
    copies = -(-_LOOP_CHARS // len(pattern))
    return Sample(f"constructed/{name}", prefix + pattern * copies, loop_start=len(prefix) + len(pattern))


def _numbered(name: str, prefix: str, item: str) -> Sample:
    copies = -(-_LOOP_CHARS // len(item))
    lines = "".join(f"{i}. {item}\n" for i in range(1, copies + 1))
    return Sample(f"constructed/{name}", prefix + lines, loop_start=len(prefix) + len(f"1. {item}\n"))


def constructed_loops() -> list[Sample]:
    return [
        _loop("english-line", "A haiku about budgets:\n\n", "A budget is a canvas of choices,\n"),
        _loop("english-phrase", "Saving money is ", "a penny's worth, "),
        _loop("english-sentence", "Why budgets matter. ", "Budgets help you plan your spending and save money. "),
        _loop("english-paragraph", "Summary:\n", (
            "Tokens are the pieces of text a model reads and writes. Every call is billed by its tokens, "
            "so long prompts and long answers cost more. Caps and budgets keep the bill predictable.\n"
        )),
        _loop("word", "token", " token"),
        _loop("exclamations", "Wow", "!"),
        _loop("dots", "And then", "."),
        _loop("newlines", "The end.", "\n"),
        _loop("spaces", "def f():", " "),
        _loop("emoji", "Great job ", "🎉"),
        _loop("chinese-sentence", "总结一下：", "我们需要节省预算。"),
        _loop("chinese-particle", "他说", "的"),
        _loop("chinese-phrase", "答案是", "人工智能，"),
        _loop("code-line", "def main():\n", "    print('hello')\n"),
        _loop("code-block", "for i in range(3):\n", "    x = compute(x)\n    if x > 10:\n        break\n"),
        _loop("json-object", '[\n  ', '{"id": 1, "name": "alice"},\n  '),
        _loop("table-row", "| a | b |\n|---|---|\n", "| 1 | 2 |\n"),
        _loop("two-line-cycle", "Q: why?\n", "Because it is.\nIt is because.\n"),
        _numbered("numbered-item", "Tips for saving money:\n", "Buy things you don't need."),
        _numbered("numbered-item-chinese", "省钱的方法：\n", "不要买不需要的东西。"),
    ]


def recorded_loops() -> list[Sample]:
    """The bundled model's own loops, recorded at greedy decoding."""
    path = DATA / "looping" / "smollm2_greedy.json"
    if not path.is_file():
        return []
    return [
        Sample(f"model/{item['prompt']}", item["text"], loop_start=item["loop_start"])
        for item in json.loads(path.read_text(encoding="utf-8"))
    ]


def looping() -> list[Sample]:
    return recorded_loops() + constructed_loops()


def pieces(text: str, size: int) -> Iterator[str]:
    """``text`` as a stream of ``size``-character pieces."""
    for start in range(0, len(text), size):
        yield text[start : start + size]


def first_stop(text: str, size: int) -> int | None:
    """How many characters of ``text``, streamed in ``size``-character pieces, passed
    before :class:`~tokenguard.RepetitionStop` ended it (``None``: it never did)."""
    watch = RepetitionStop().watch()
    seen = 0
    for piece in pieces(text, size):
        verdict = watch.feed(piece)
        if not isinstance(verdict, str):
            return seen + len(verdict.keep)
        seen += len(piece)
    return None
