"""What every strategy reads of a message: its canonical form, its fingerprint, its text,
the terms lexical matching compares."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "FINGERPRINT_FIELDS", "INSTRUCTION_ROLES", "answered_calls_only", "canonical", "content_text", "fingerprint",
    "is_instruction", "message_line", "message_text", "terms", "turn_key",
]

#: The fields that make two messages the same message: who said it, what it says, and
#: the tool fields that tie a tool call to its results. Anything else a message carries
#: (provider hints such as ``cache_control``) does not change what the model reads.
FINGERPRINT_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


#: The roles of the messages that instruct the model rather than take part in the chat:
#: every strategy keeps them. OpenAI's newer models take ``developer`` where older ones
#: take ``system``.
INSTRUCTION_ROLES = frozenset({"system", "developer"})


def is_instruction(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` is a system (or developer) message."""
    return message.get("role") in INSTRUCTION_ROLES


def canonical(value: object) -> bytes:
    """One byte string per value: JSON with sorted keys, so equal messages (or turns)
    give equal bytes whatever order their keys were written in."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


def fingerprint(message: Mapping[str, Any]) -> str:
    """A short hash of the message's :data:`FINGERPRINT_FIELDS`: the same message sent
    again, by any caller, has the same fingerprint."""
    fields = {name: message[name] for name in FINGERPRINT_FIELDS if message.get(name) is not None}
    return hashlib.blake2b(canonical(fields), digest_size=16).hexdigest()


def turn_key(turn: Sequence[Mapping[str, Any]]) -> str:
    """A short hash of whole messages (every field): what a strategy files a turn's
    count or vector under."""
    return hashlib.blake2b(canonical(list(turn)), digest_size=16).hexdigest()


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def message_text(message: Mapping[str, Any]) -> str:
    """What a message says: its content's text and, for a tool call, the called
    functions' names and arguments."""
    text = content_text(message.get("content"))
    calls = message.get("tool_calls")
    if not calls:
        return text
    parts = [text]
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            parts += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    return "\n".join(parts)


def message_line(message: Mapping[str, Any]) -> str:
    """A message as one transcript line, for a strategy that retells it (a summary's
    input, a recalled turn): ``"user: ..."``, ``"tool result: ..."``."""
    role = message.get("role")
    return f"{'tool result' if role == 'tool' else role}: {message_text(message)}"


def answered_calls_only(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``messages`` with each assistant message's tool calls cut to those the tool
    messages right after it answer, and the late results of the calls cut left out with
    them: OpenAI refuses a call left unanswered, and a result of no call before it (a
    chat that went on without a call's result must not send the call, nor its result
    later). A call that is no dict is left for the count to refuse. Messages not changed
    are the same objects."""
    kept: list[Mapping[str, Any]] = []
    cut: set[object] = set()  # ids whose latest call was cut: their results go too
    for i, message in enumerate(messages):
        if message.get("role") == "tool" and message.get("tool_call_id") in cut:
            continue
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if calls and isinstance(calls, list):
            answered = set()
            for later in messages[i + 1:]:
                if later.get("role") != "tool":
                    break
                answered.add(later.get("tool_call_id"))
            left = [call for call in calls if not isinstance(call, Mapping) or call.get("id") in answered]
            made = {call.get("id") for call in calls if isinstance(call, Mapping)}
            cut = (cut - made) | (made - answered)
            if len(left) != len(calls):
                message = {key: value for key, value in message.items() if key != "tool_calls"}
                if left:
                    message["tool_calls"] = left
                elif message.get("content") is None:
                    message["content"] = ""  # an assistant message says something, or calls
        kept.append(message)
    return kept


# Terms: words, and for runs of CJK characters (no spaces between words) their pairs.
_WORD = re.compile(r"\w+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def terms(text: str) -> list[str]:
    """The words lexical scoring matches on: case-folded words (one-letter ASCII words
    say nothing), and for runs of CJK characters, which have no spaces, their
    character pairs."""
    found: list[str] = []
    for word in _WORD.findall(text.casefold()):
        if _CJK.search(word):
            found += [word[i : i + 2] for i in range(len(word) - 1)] or [word]
        elif len(word) > 1 or not word.isascii():
            found.append(word)
    return found
