"""Checked by mypy (`make test`), not run: what type checkers see of `@guard`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

from typing_extensions import assert_type

import tokenguard as tg
from tokenguard import Guard, Guarded, Reply
from tokenguard.pipeline import AsyncGuardStream, GuardStream


@tg.guard(model="gpt-4o")
def ask(messages: list[dict[str, Any]], max_tokens: int) -> str:
    return "Paris"


@tg.guard(model="gpt-4o")
async def aask(messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    return {"choices": []}


# A stream's guarded twin depends on the function's kind, which its return annotation
# shows only in part; where its parameters hold Any, mypy gives up on such ambiguous
# overloads and says Any (hence list[dict[str, str]] here).
@tg.guard(model="gpt-4o")
def pieces(messages: list[dict[str, str]]) -> Iterator[str]:
    yield "a"


@tg.guard(model="gpt-4o")
async def apieces(messages: list[dict[str, str]]) -> AsyncIterator[str]:
    yield "a"


assert_type(ask("hi", user="alice", tags={"team": "search"}), str)
pending = assert_type(aask("hi", session="s1"), Coroutine[Any, Any, dict[str, Any]])
pending.close()
assert_type(pieces("hi"), GuardStream | Reply)
assert_type(ask, Guarded[str])
assert_type(apieces("hi"), AsyncGuardStream)
assert_type(ask.guard, Guard)
assert_type(tg.reply_of(ask("hi")), Reply)
