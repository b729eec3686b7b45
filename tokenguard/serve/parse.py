"""OpenAI requests checked into what the guard needs, or refused with a 400 that names the field.

The gateway answers text. A request that asks for something it cannot deliver (tools,
several choices, log probabilities, images) is refused rather than answered without
it. A field whose value is ``null``, ``false`` or empty asks for nothing and is
ignored, since many clients send every field. Sampling parameters are forwarded only
where the backend takes them: :data:`BUNDLED_PARAMS` for the bundled runner,
:data:`UPSTREAM_PARAMS` for an OpenAI-compatible server, :data:`COMMON_PARAMS` for a
function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Literal

from tokenguard.serve.errors import ApiError, invalid

__all__ = [
    "BUNDLED_PARAMS",
    "COMMON_PARAMS",
    "UPSTREAM_PARAMS",
    "ParsedRequest",
    "parse_chat",
    "parse_completion",
]

Kind = Literal["chat", "text"]

_MAX_USER_CHARS = 256
_MAX_METADATA = 16
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        # An int is compared exactly: one of 400 digits is out of range, not a float overflow.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise invalid(f"'{name}' must be a number", name)
        if value > high or value < low or (low_open and value == low):
            raise invalid(f"'{name}' must be {'>' if low_open else '>='} {low} and <= {high}, got {value}", name)
        return value
    return check


def _integer(low: int) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise invalid(f"'{name}' must be an integer >= {low}, got {value!r}", name)
        return value
    return check


def _stop(name: str, value: Any) -> Any:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 1 <= len(items) <= 4 or not all(isinstance(s, str) and s for s in items):
        raise invalid("'stop' must be a non-empty string or a list of 1 to 4 of them", name)
    return value


def _logit_bias(name: str, value: Any) -> Any:
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100 for v in value.values()
    ):
        raise invalid("'logit_bias' maps token ids to numbers from -100 to 100", name)
    return value


def _response_format(name: str, value: Any) -> Any:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("'response_format' is {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}", name)
    return value


# Sampling parameters the gateway understands, each with its check.
_SAMPLING: dict[str, Callable[[str, Any], Any]] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, low_open=True),
    "seed": _integer(-(2**63)),
    "stop": _stop,
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _logit_bias,
    "response_format": _response_format,
    "top_k": _integer(0),
    "repetition_penalty": _number(0, 10, low_open=True),
    "min_p": _number(0, 1),
}
#: What any backend is given: a plain function takes them as keyword arguments.
COMMON_PARAMS = frozenset({"temperature", "top_p", "seed", "stop"})
#: What the bundled runner takes (``LlamaRunner.stream``).
BUNDLED_PARAMS = COMMON_PARAMS | {"top_k", "repetition_penalty"}
#: What an OpenAI-compatible server is forwarded (vLLM also reads top_k, min_p, repetition_penalty).
UPSTREAM_PARAMS = frozenset(_SAMPLING)

# Fields that ask for what a text gateway cannot give, with the reason it says.
_REFUSED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "parallel_tool_calls": "tool calls", "logprobs": "log probabilities",
    "top_logprobs": "log probabilities", "audio": "audio", "modalities": "other modalities",
    "prediction": "predicted outputs", "web_search_options": "web search", "echo": "echoing the prompt",
    "suffix": "suffixes", "best_of": "best_of",
}
_GATEWAY_FIELDS = frozenset({"model", "stream", "stream_options", "user", "metadata", "max_tokens",
                             "max_completion_tokens", "n", "store", "service_tier"})
_KNOWN = _GATEWAY_FIELDS | _SAMPLING.keys() | _REFUSED.keys() | {"messages", "prompt"}
_PLAIN = _KNOWN - _REFUSED.keys()  # known fields that never ask for what is refused


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """One checked request: the messages and parameters for ``guard.prepare`` and how to answer."""

    kind: Kind
    messages: list[dict[str, Any]]
    #: ``max_tokens`` (when the client set it) and the forwarded sampling parameters.
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    #: The OpenAI ``user`` field: the caller's identity when the gateway has no key file.
    user: str | None
    #: The OpenAI ``metadata`` field: written to the ledger as the call's tags.
    tags: dict[str, str] | None


def _asks(value: Any) -> bool:
    """Whether a field's value asks for anything (``null``, ``false``, ``[]``, ``{}`` do not)."""
    return value is not None and value is not False and value != [] and value != {}


# Values that ask for nothing a field's absence does not: clients that send every field
# with its default (penalties of 0, an empty logit_bias) must not be refused for them.
_NEUTRAL: dict[str, Any] = {
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
    "min_p": 0, "repetition_penalty": 1, "tool_choice": "none", "top_logprobs": 0, "best_of": 1,
}


def _neutral(name: str, value: Any) -> bool:
    return name in _NEUTRAL and not isinstance(value, bool) and value == _NEUTRAL[name]


def _check_model(body: Mapping[str, Any], model: str) -> None:
    asked = body.get("model")
    if not isinstance(asked, str) or not asked:
        raise invalid("'model' is required: the name of the model to use (see GET /v1/models)", "model")
    if asked != model:
        raise ApiError(404, f"the model {asked!r} does not exist here; this gateway serves {model!r}",
                       code="model_not_found", param="model", reason="model_not_found")


def _content(index: int, role: str, content: Any) -> Any:
    where = f"messages[{index}]"
    if content is None:
        if role != "assistant":
            raise invalid(f"{where} ({role}) has no content; only an assistant message may omit it", where)
        return None
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise invalid(
                f"{where}.content[{j}] is of type {kind!r}; this gateway counts and serves text parts only",
                f"{where}.content",
            )
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}.content[{j}].text must be a string", f"{where}.content")
        _only(part, {"type", "text"}, f"{where}.content[{j}]")
        parts.append({"type": "text", "text": part["text"]})  # what is counted is what is forwarded
    return parts


def _tool_calls(index: int, value: Any) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, as counted and forwarded: their id,
    function name and arguments."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(value, list):
        raise invalid(f"{where} must be a list of tool calls", where)
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(call.get("id"), str)
                or not all(isinstance(function.get(k), str) for k in ("name", "arguments"))):
            raise invalid(f"{where}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                          "{\"name\", \"arguments\"}} with string values", where)
        _only(call, {"id", "type", "function"}, f"{where}[{j}]")
        _only(function, {"name", "arguments"}, f"{where}[{j}].function")
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": function["name"], "arguments": function["arguments"]}})
    return calls


def _only(fields: dict[str, Any], known: Set[str], where: str) -> None:
    """Refuse fields beyond ``known`` that ask for anything: the gateway would forward
    them uncounted (a budget and an input cap see only what is counted)."""
    unknown = sorted(k for k, v in fields.items() if k not in known and _asks(v))
    if unknown:
        raise invalid(f"{where} has fields this gateway does not take: {', '.join(unknown)}", where)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, got {role!r}",
                          f"messages[{i}].role")
        _only(message, _MESSAGE_KEYS, f"messages[{i}]")
        kept = {k: v for k, v in message.items() if k in _MESSAGE_KEYS and v is not None}
        kept["content"] = _content(i, role, message.get("content"))
        if "tool_calls" in kept:
            kept["tool_calls"] = _tool_calls(i, kept["tool_calls"])
        for key in ("name", "tool_call_id"):
            if key in kept and not isinstance(kept[key], str):
                raise invalid(f"messages[{i}].{key} must be a string", f"messages[{i}].{key}")
        messages.append(kept)
    return messages


def _common(body: Any, model: str, allowed: frozenset[str]) -> tuple[dict[str, Any], bool, bool, str | None,
                                                                      dict[str, str] | None]:
    """The fields both endpoints share: parameters, streaming, user and metadata."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _check_model(body, model)
    if not body.keys() <= _PLAIN:  # the common case skips both checks
        for name, value in body.items():
            if name in _REFUSED and _asks(value) and not _neutral(name, value):
                raise invalid(f"'{name}' is not supported: this gateway answers text, without {_REFUSED[name]}", name)
        unknown = sorted(name for name, value in body.items() if name not in _KNOWN and value is not None)
        if unknown:
            raise invalid(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}", unknown[0])
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):  # true == 1 in Python, not in JSON
        raise invalid("'n' must be 1: this gateway answers with one choice", "n")
    params: dict[str, Any] = {}
    caps = [(k, body[k]) for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    for name, value in caps:
        _integer(1)(name, value)  # as OpenAI: an answer of no tokens is no answer
    if caps:
        params["max_tokens"] = min(value for _, value in caps)
    for name in body.keys() & _SAMPLING.keys():
        value, check = body[name], _SAMPLING[name]
        if value is None:
            continue
        if name not in allowed:
            if _neutral(name, value):
                continue  # asks for nothing this backend does not do anyway
            takes = ", ".join(sorted(allowed))
            raise invalid(f"'{name}' is not supported by this gateway's backend; it takes: {takes}", name)
        params[name] = check(name, value)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise invalid("'stream_options' is {\"include_usage\": true | false}", "stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = bool(options.get("include_usage"))
    user = body.get("user") or None  # "" names nobody
    if user is not None and (not isinstance(user, str) or not user or len(user) > _MAX_USER_CHARS):
        raise invalid(f"'user' must be a string of 1 to {_MAX_USER_CHARS} characters", "user")
    return params, bool(stream), include_usage, user, _metadata(body.get("metadata"))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None or value == {}:
        return None
    if (not isinstance(value, dict) or len(value) > _MAX_METADATA
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                       for k, v in value.items())):
        raise invalid(f"'metadata' is at most {_MAX_METADATA} string pairs (keys up to 64, values up to 512 "
                      "characters)", "metadata")
    return dict(value)


def parse_chat(body: Any, *, model: str, allowed: frozenset[str]) -> ParsedRequest:
    """A ``POST /v1/chat/completions`` body, checked; ``model`` is the one served,
    ``allowed`` the sampling parameters the backend takes."""
    params, stream, include_usage, user, tags = _common(body, model, allowed)
    if body.get("prompt") is not None:
        raise invalid("'prompt' belongs to /v1/completions; chat completions take 'messages'", "prompt")
    return ParsedRequest("chat", _messages(body.get("messages")), params, stream, include_usage, user, tags)


def parse_completion(body: Any, *, model: str, allowed: frozenset[str]) -> ParsedRequest:
    """A ``POST /v1/completions`` body, checked. The prompt is sent as one user
    message: every backend of the guard answers chat messages."""
    params, stream, include_usage, user, tags = _common(body, model, allowed)
    if body.get("messages") is not None:
        raise invalid("'messages' belongs to /v1/chat/completions; completions take 'prompt'", "messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string (or a list of one string)", "prompt")
    return ParsedRequest("text", [{"role": "user", "content": prompt}], params, stream, include_usage, user, tags)
