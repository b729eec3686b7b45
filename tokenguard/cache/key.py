"""What a cached answer is filed under: a tenant partition and a request fingerprint.

The partition is a hard boundary: an entry is only ever returned to calls of the same
partition (``"user"``: the same ``user=``; ``"session"``: the same ``session=``;
``"global"``: everyone). The fingerprint covers everything that changes the answer:
the backend (for a decorated function, which function and its bound arguments), the
model, every message that is sent (system prompt and tool messages included), and every
generation parameter (``tools``, ``tool_choice``, ``response_format``, ``temperature``,
``max_tokens``, ...). Only the ``session`` and ``user`` ids the guard hands a backend
are left out: they change where the KV lives and whom to bill, not the answer (the
partition keeps users apart).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal

import numpy

from tokenguard.errors import ConfigError

if TYPE_CHECKING:
    from tokenguard.pipeline.call import Call

CacheScope = Literal["user", "session", "global"]
SCOPES: tuple[CacheScope, ...] = ("user", "session", "global")
# What the guard hands a backend itself: the caller's ids. The partition (the scope)
# is what keeps users apart, so a global cache is shared by everyone.
_NOT_ANSWER_PARAMS = frozenset({"session", "user"})


def check_scope(scope: str) -> CacheScope:
    if scope not in SCOPES:
        raise ConfigError(f"cache scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    return scope


def partition(call: Call, scope: CacheScope) -> str | None:
    """The partition ``call`` reads and writes in, or ``None`` when it has none (a
    session-scoped cache and a call without ``session=``: such calls are not cached)."""
    if scope == "global":
        return "global"
    if scope == "session":
        return None if call.session is None else f"session:{call.session}"
    return f"user:{call.user or ''}"


def cached_partition(call: Call, scope: CacheScope, cache_sampled: bool) -> str | None:
    """The partition a cache files ``call`` under, or ``None`` when the call is not
    cached: it has no partition, or it may sample (unless ``cache_sampled``)."""
    where = partition(call, scope)
    if where is None or not (cache_sampled or is_deterministic(call)):
        return None
    return where


def is_deterministic(call: Call) -> bool:
    """Whether the request asks for the same answer every time: ``temperature=0``, or
    no temperature given to a backend that decodes greedily by default."""
    temperature = call.params.get("temperature")
    if temperature is None:
        return call.backend.greedy_by_default
    return bool(temperature == 0)


def fingerprint(call: Call, *, skip_last: bool = False) -> str:
    """A hex digest of everything in ``call`` that changes the answer; with
    ``skip_last``, of everything but the newest message's content (the conversation it is
    asked in, and who asks it: a semantic cache compares that content by meaning)."""
    if skip_last:
        *earlier, last = call.messages
        messages = [*earlier, {k: v for k, v in last.items() if k != "content"}]
    if call.backend_identity is None:
        call.backend_identity = call.backend.cache_identity()
    request = {
        "backend": call.backend_identity,
        "model": call.model,
        "messages": messages if skip_last else call.messages,
        "params": {k: _number(v) for k, v in sorted(call.params.items()) if k not in _NOT_ANSWER_PARAMS},
    }
    return digest(request)


def _number(value: Any) -> Any:
    """A whole float as the int it equals: ``temperature=0`` and ``0.0`` ask alike."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def digest(value: Any) -> str:
    """SHA-256 of ``value``'s canonical JSON (sorted keys, written as text as JSON writes
    them; objects JSON cannot encode: a pydantic model class by its JSON schema, an
    instance by its data, an array by its data, else their ``repr``)."""
    try:
        text = _canonical_json(value)
    except TypeError:  # keys of several types (logit_bias={50256: -100, "1734": 5}) do not sort
        text = _canonical_json(_text_keys(value))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def _text_keys(value: Any) -> Any:
    """``value`` with every dict key as the text JSON sends it as (``1`` and ``"1"`` alike)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else json.dumps(k): _text_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text_keys(item) for item in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, type):
        schema = getattr(value, "model_json_schema", None)  # a pydantic model class as response_format
        if callable(schema):
            try:
                return {"schema": schema()}
            except Exception:  # noqa: BLE001 - fall back to the repr below
                pass
    else:
        dump = getattr(value, "model_dump", None)  # a pydantic model instance: its class and data
        if callable(dump):
            try:
                return {"model": f"{type(value).__module__}.{type(value).__qualname__}", "data": dump(mode="json")}
            except Exception:  # noqa: BLE001 - fall back to the repr below
                pass
    if hasattr(value, "__array__") and not isinstance(value, type):  # numpy, pandas: their repr elides
        try:
            array = numpy.asarray(value)
        except Exception:  # noqa: BLE001 - e.g. a tensor on a GPU: fall back to the repr below
            pass
        else:
            if array.dtype != object:
                data = hashlib.sha256(numpy.ascontiguousarray(array).tobytes()).hexdigest()
                return {"array": [str(array.dtype), list(array.shape), data]}
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)
