"""Answers in OpenAI's shapes: a whole completion as JSON, or its server-sent events.

``usage`` carries the guard's exact counts, the ones its ledger row holds:
``prompt_tokens`` (cached ones included), ``completion_tokens`` and
``prompt_tokens_details.cached_tokens`` (what the backend served from its own KV or
prompt cache). A reply from the tokenguard cache bills nothing, so its usage is 0.
What OpenAI's format has no field for is under ``"tokenguard"`` (the ledger's
``request_id``, cost, savings, cache hit, stop reason); OpenAI clients keep unknown
fields (``completion.tokenguard`` in the Python client).
"""

from __future__ import annotations

import json
from typing import Any

from tokenguard.accounting import Reply, Usage
from tokenguard.serve.errors import ApiError
from tokenguard.serve.parse import Kind

__all__ = ["DONE", "Answer", "dumps", "finish_reason", "usage_json"]

#: The event that ends a stream.
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8; text that UTF-8 cannot hold (half of a UTF-16 pair, as a
    backend may cut one) as JSON's escapes."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def finish_reason(reply: Reply) -> str:
    """OpenAI's ``finish_reason`` for a reply: ``"length"`` when its text was cut at the
    output cap (a cached answer's when the call that stored it was), the upstream's
    ``"content_filter"`` or ``"tool_calls"`` as it said them, else ``"stop"`` (the model
    finished, a stop string, a loop the guard ended)."""
    reason = reply.cached_stop_reason or reply.stop_reason
    return reason if reason in _OPENAI_REASONS else "stop"


_OPENAI_REASONS = frozenset({"length", "content_filter", "tool_calls"})


def usage_json(usage: Usage) -> dict[str, Any]:
    """The ``usage`` object of an answer."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def _extension(reply: Reply) -> dict[str, Any]:
    usage = reply.usage
    return {"request_id": reply.request_id, "stop_reason": reply.stop_reason, "cached": reply.cached,
            "cost_usd": usage.cost_usd, "saved_tokens": usage.saved_tokens, "saved_usd": usage.saved_usd}


class Answer:
    """The answer to one request, for ``kind`` ``"chat"`` (``/v1/chat/completions``) or
    ``"text"`` (``/v1/completions``). Its ``id`` holds the call's ledger ``request_id``."""

    __slots__ = ("_first", "_head", "_role_head", "_tail", "created", "id", "kind", "model")

    def __init__(self, kind: Kind, request_id: str, model: str, created: int) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = created
        self._first = True
        # Every text event is the same JSON around its piece: built once.
        head = {"id": self.id, "object": self._object(stream=True), "created": created, "model": model}
        opening = dumps(head)[:-1]  # without the closing brace
        if kind == "chat":
            delta = b"data: " + opening + b',"choices":[{"index":0,"delta":{'
            self._head = delta + b'"content":'
            self._role_head = delta + b'"role":"assistant","content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._head = self._role_head = b"data: " + opening + b',"choices":[{"index":0,"text":'
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def _object(self, *, stream: bool) -> str:
        if self.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if stream else "chat.completion"

    def whole(self, reply: Reply) -> dict[str, Any]:
        """The complete answer (``stream`` false)."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": reply.text, "refusal": None}
        else:
            choice["text"] = reply.text
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(reply)
        return {"id": self.id, "object": self._object(stream=False), "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage_json(reply.usage), "tokenguard": _extension(reply)}

    def piece(self, text: str) -> bytes:
        """The event of one text piece; a chat stream's first also names the role."""
        if self._first:
            self._first = False
            return self._role_head + dumps(text) + self._tail
        return self._head + dumps(text) + self._tail

    def end(self, reply: Reply, include_usage: bool) -> bytes:
        """The closing events: the finish reason, the usage when asked, then ``[DONE]``."""
        events = []
        if self._first and self.kind == "chat":  # an empty answer still names the role
            events.append(self.piece(""))
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(reply)
        head = {"id": self.id, "object": self._object(stream=True), "created": self.created, "model": self.model}
        events.append(b"data: " + dumps({**head, "choices": [choice], "tokenguard": _extension(reply)}) + b"\n\n")
        if include_usage:
            events.append(b"data: " + dumps({**head, "choices": [], "usage": usage_json(reply.usage)}) + b"\n\n")
        events.append(DONE)
        return b"".join(events)

    @staticmethod
    def error_event(error: ApiError) -> bytes:
        """A failure after the stream began: one ``error`` event (OpenAI clients raise it)."""
        return b"data: " + dumps(error.body()) + b"\n\n"
