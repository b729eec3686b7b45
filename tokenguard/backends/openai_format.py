"""Reading OpenAI-shaped results: chat completions, stream chunks and ``usage``,
as dicts (JSON) or as objects (the ``openai`` package's models) alike."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from tokenguard.backends.base import BackendUsage, Chunk, reported_count
from tokenguard.errors import BackendError

__all__ = [
    "chunk_from_completion",
    "chunk_from_stream_item",
    "completion_with_text",
    "is_completion",
    "usage_from",
]


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _set(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[name] = value
    else:
        setattr(obj, name, value)


def usage_from(obj: Any) -> BackendUsage | None:
    """The ``usage`` of a completion or final stream chunk, OpenAI's names
    (``prompt_tokens``/``completion_tokens``/``prompt_tokens_details.cached_tokens``)
    or the newer ``input_tokens``/``output_tokens``; ``None`` when absent."""
    usage = _get(obj, "usage")
    if usage is None:
        return None
    input_tokens = reported_count(_get(usage, "prompt_tokens"))
    if input_tokens is None:
        input_tokens = reported_count(_get(usage, "input_tokens"))
    output_tokens = reported_count(_get(usage, "completion_tokens"))
    if output_tokens is None:
        output_tokens = reported_count(_get(usage, "output_tokens"))
    details = _get(usage, "prompt_tokens_details") or _get(usage, "input_tokens_details")
    cached = reported_count(_get(details, "cached_tokens"))
    if input_tokens is None and output_tokens is None:
        return None
    return BackendUsage(input_tokens, output_tokens, cached)


def is_completion(obj: Any) -> bool:
    """Whether ``obj`` looks like a chat completion (or a stream chunk): it has ``choices``."""
    return not isinstance(obj, (str, bytes)) and _get(obj, "choices") is not None


def _first_choice(obj: Any) -> Any:
    """The answer the guard meters: choice 0 (with ``n > 1`` a stream interleaves the
    choices' chunks, each marked with its ``index``; the others are not read)."""
    choices = _get(obj, "choices")
    if not choices:
        return None
    if isinstance(choices, (str, bytes, dict)) or not hasattr(choices, "__getitem__"):
        raise BackendError(f"a malformed completion: 'choices' must be a list, got {type(choices).__name__}")
    return next((choice for choice in choices if _get(choice, "index") in (0, None)), None)


def chunk_from_completion(obj: Any) -> Chunk:
    """A whole (non-streamed) chat completion as one chunk."""
    choice = _first_choice(obj)
    message = _get(choice, "message")
    text = _get(message, "content")
    if text is None:
        text = _get(choice, "text")  # legacy completions
    return Chunk(
        text=_text(text),
        finish_reason=_reason(_get(choice, "finish_reason")),
        usage=usage_from(obj),
        calls_tools=_calls_tools(message),
        tool_text=_function_call_text(message),
        tool_calls=_tool_calls(message),
    )


def _text(content: Any) -> str:
    """A message's or delta's content as text: a string, or a list of text parts (as
    Mistral's API sends them); anything else is a malformed answer."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, Mapping) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise BackendError(f"a malformed answer: content must be text or a list of text parts, got {content!r:.200}")


def _reason(finish_reason: Any) -> str | None:
    if finish_reason is None or isinstance(finish_reason, str):
        return finish_reason
    raise BackendError(f"a malformed answer: finish_reason must be text, got {finish_reason!r:.200}")


def _calls_tools(message: Any) -> bool:
    """Whether a message (or a stream delta) holds tool calls (or the legacy
    ``function_call``): the answer calls tools even when the server ends it with
    ``"stop"`` (OpenAI does when ``tool_choice`` named the function, and some servers
    always do)."""
    return message is not None and bool(_get(message, "tool_calls") or _get(message, "function_call"))


def _function_call_text(message: Any) -> str:
    """The name and arguments of a message's (or a delta's) legacy ``function_call``, as
    text (its ``tool_calls`` go as :func:`_tool_calls`, whose text the guard meters as
    it joins them)."""
    legacy = _get(message, "function_call") if message is not None else None
    if legacy is None or isinstance(legacy, (str, bytes)):
        return ""
    return "".join(value for field in ("name", "arguments") if isinstance(value := _get(legacy, field), str))


def _tool_calls(message: Any) -> tuple[dict[str, Any], ...]:
    """A message's (or a delta's) tool calls as plain dicts in OpenAI's shape, with what
    each part holds: ``index``, ``id`` and ``type`` where given, and the ``function``'s
    ``name`` and ``arguments`` (a stream sends the arguments in pieces)."""
    calls = _get(message, "tool_calls") if message is not None else None
    if not calls or isinstance(calls, (str, bytes, Mapping)) or not hasattr(calls, "__iter__"):
        return ()
    parts = []
    for call in calls:
        part: dict[str, Any] = {key: value for key in ("index", "id", "type")
                                if (value := _get(call, key)) is not None}
        function = _get(call, "function")
        part["function"] = {field: value for field in ("name", "arguments")
                            if isinstance(value := _get(function, field), str)}
        parts.append(part)
    return tuple(parts)


def completion_with_text(obj: Any, text: str, finish_reason: str | None = None) -> Any:
    """A copy of a chat completion (object or dict) whose first choice says ``text``
    instead, and ends with ``finish_reason`` when one is given; all else (tool calls,
    ids, usage) as it was."""
    copied = copy.deepcopy(obj)
    choice = _first_choice(copied)
    message = _get(choice, "message")
    if message is not None:
        _set(message, "content", text)
    else:
        _set(choice, "text", text)  # legacy completions
    if finish_reason is not None:
        _set(choice, "finish_reason", finish_reason)
    return copied


# What a completion says about its own question, beyond its text: a cache hit answering
# another question in its shape must not carry it.
_ANSWER_FIELDS = ("tool_calls", "function_call", "refusal", "audio", "annotations")


def completion_from_cache(template: Any, text: str, finish_reason: str, completion_id: str) -> Any:
    """A chat completion of ``template``'s type (object or dict) answering ``text`` from
    a cache: ``completion_id``, one choice, none of the template's tool calls, refusal,
    log probabilities or fingerprint, and a usage of zero (a hit bills nothing)."""
    copied = completion_with_text(template, text, finish_reason)
    choice = _first_choice(copied)
    _set(copied, "choices", [choice])
    for owner, name in ((copied, "id"), (copied, "system_fingerprint"), (choice, "logprobs")):
        if _get(owner, name) is not None:
            _set(owner, name, completion_id if name == "id" else None)
    message = _get(choice, "message")
    for name in _ANSWER_FIELDS if message is not None else ():
        if _get(message, name):
            _set(message, name, None)
    usage = _get(copied, "usage")
    if usage is not None:
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if _get(usage, name) is not None:
                _set(usage, name, 0)
    return copied


def chunk_from_stream_item(item: Any) -> Chunk:
    """One item of a stream: a plain string, or an OpenAI stream chunk (whose ``delta``
    holds the text; the last chunk may hold only ``usage``)."""
    if isinstance(item, str):
        return Chunk(text=item)
    if not is_completion(item) and usage_from(item) is None:
        raise BackendError(
            f"a malformed stream item: {type(item).__name__} is neither text nor an OpenAI stream chunk"
        )
    choice = _first_choice(item)
    delta = _get(choice, "delta")
    text = _get(delta, "content")
    if text is None and delta is None:
        text = _get(_get(choice, "message"), "content") or _get(choice, "text")
    said = delta if delta is not None else _get(choice, "message")
    return Chunk(
        text=_text(text),
        finish_reason=_reason(_get(choice, "finish_reason")),
        usage=usage_from(item),
        calls_tools=_calls_tools(said),
        tool_text=_function_call_text(said),
        tool_calls=_tool_calls(said),
    )
