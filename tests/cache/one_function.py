"""One answering function, defined alike in this process and in another, for the tests
that share a cache between processes: a cache keys a function by its name and its code,
so both must be the same (and the constant globals it reads: ``WHO`` is a dict, state,
so it is not one). ``WHO`` says which process answered, ``CALLS`` what it was asked."""

from __future__ import annotations

import textwrap
from typing import Any

SOURCE = textwrap.dedent("""
    CALLS = []

    def answers(messages, *, max_tokens, temperature):
        CALLS.append(messages[-1]["content"])
        return "written by " + WHO["writer"]
""")


def answers_here(writer: str) -> tuple[Any, list[str]]:
    """This process's ``answers`` (in ``__main__``, as in a ``python -c`` script), writing
    as ``writer``, and the list of what it was asked."""
    namespace: dict[str, Any] = {"__name__": "__main__", "WHO": {"writer": writer}}
    exec(SOURCE, namespace)
    return namespace["answers"], namespace["CALLS"]


def script_prelude(writer: str) -> str:
    """The same ``answers`` at the top of another process's script."""
    return f"WHO = {{'writer': {writer!r}}}\n" + SOURCE
