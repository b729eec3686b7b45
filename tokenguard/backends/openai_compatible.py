"""A backend for any OpenAI-compatible chat-completions server (OpenAI, vLLM, TGI,
llama.cpp server, Ollama, ``tokenguard serve``), streaming over SSE with httpx."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from tokenguard.backends.base import Backend, Chunk, Params
from tokenguard.backends.openai_format import chunk_from_stream_item
from tokenguard.backends.sse import aiter_sse_data, iter_sse_data
from tokenguard.errors import BackendError, UnknownTokenizer

if TYPE_CHECKING:
    from tokenguard.tokens import Message, Tokenizer

__all__ = ["OpenAICompatible"]

_DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# A stream that stops with neither a finish reason nor [DONE] was cut off.
_TRUNCATED = "the server closed the stream before it finished (no finish_reason, no [DONE])"


def _parse(data: str) -> Chunk | None:
    if data.strip() == "[DONE]":
        return None
    try:
        item = json.loads(data)
    except json.JSONDecodeError as error:
        raise BackendError(f"the server sent an event that is not JSON: {data[:200]!r}") from error
    if isinstance(item, dict) and item.get("error"):
        raise BackendError(f"the server reported an error mid-stream: {item['error']}")
    return chunk_from_stream_item(item)


def _error(response: httpx.Response, body: bytes) -> BackendError:
    text = body[:500].decode("utf-8", "replace")
    return BackendError(
        f"{response.request.method} {response.request.url} answered {response.status_code}: {text}",
        response.status_code,
    )


class OpenAICompatible(Backend):
    """Stream chat completions from ``{base_url}/chat/completions``.

    Requests ``stream_options.include_usage`` so the server reports exact usage at the
    end of the stream; a stream the guard cuts short is metered by the guard's own count.
    ``tokenizer`` names what the guard meters with (default: ``model``'s tokenizer, when
    tokenguard knows it). ``max_tokens_param`` is ``"max_tokens"`` or, for OpenAI's
    reasoning models, ``"max_completion_tokens"``.

    >>> backend = OpenAICompatible("http://127.0.0.1:8000/v1", "gpt-4o-mini")
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        tokenizer: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_tokens_param: str = "max_tokens",
        include_usage: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.url = f"{self.base_url}/chat/completions"
        self.tokenizer_name = tokenizer
        self.max_tokens_param = max_tokens_param
        self.include_usage = include_usage
        self.headers = {"Accept": "text/event-stream", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = _DEFAULT_TIMEOUT if timeout is None else timeout
        self._client: httpx.Client | None = None
        # One AsyncClient per event loop: an httpx AsyncClient must not cross loops.
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def tokenizer(self) -> Tokenizer | None:
        from tokenguard.tokens import get_tokenizer

        try:
            return get_tokenizer(self.tokenizer_name or self.model)
        except UnknownTokenizer:
            if self.tokenizer_name:
                raise
            return None

    def _body(self, messages: Sequence[Message], params: Params) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "stream": True}
        rest = dict(params)
        max_tokens = rest.pop("max_tokens", None)
        if max_tokens is not None:
            body[self.max_tokens_param] = max_tokens
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(rest)
        return body

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout)
        return self._client

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        with self.client.stream("POST", self.url, json=self._body(messages, params), headers=self.headers) as r:
            if r.status_code >= 400:
                raise _error(r, r.read())
            finished = False
            for data in iter_sse_data(r.iter_lines()):
                chunk = _parse(data)
                if chunk is None:
                    return
                finished = finished or chunk.finish_reason is not None
                yield chunk
            if not finished:
                raise BackendError(_TRUNCATED)

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = httpx.AsyncClient(timeout=self.timeout)
        return client

    async def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        body = self._body(messages, params)
        async with self._aclient().stream("POST", self.url, json=body, headers=self.headers) as r:
            if r.status_code >= 400:
                raise _error(r, await r.aread())
            finished = False
            async for data in aiter_sse_data(r.aiter_lines()):
                chunk = _parse(data)
                if chunk is None:
                    return
                finished = finished or chunk.finish_reason is not None
                yield chunk
            if not finished:
                raise BackendError(_TRUNCATED)

    def close(self) -> None:
        """Close the sync HTTP client (async clients close with their event loop)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __repr__(self) -> str:
        return f"OpenAICompatible({self.base_url!r}, {self.model!r})"
