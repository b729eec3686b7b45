"""A backend for any OpenAI-compatible chat-completions server (OpenAI, vLLM, TGI,
llama.cpp server, Ollama, ``tokenguard serve``), streaming over SSE: with httpx for
sync calls and aiohttp for async ones (see :mod:`~tokenguard.backends.async_http`)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import re
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx

from tokenguard.backends.async_http import Target, new_session
from tokenguard.backends.base import Backend, Chunk, Params
from tokenguard.backends.openai_format import chunk_from_completion, chunk_from_stream_item, is_completion
from tokenguard.backends.sse import EventStream
from tokenguard.errors import BackendError, BackendTimeout, ConfigError, InvalidRequest, UnknownTokenizer

if TYPE_CHECKING:
    from tokenguard.tokens import Message, Tokenizer

__all__ = ["OpenAICompatible"]

_DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Reads past ``[DONE]`` for the body's end (usually one, empty): a response read to its
# end gives its connection back to the pool; a server that goes on is cut off there.
_AFTER_DONE = 16
# How long an async call waits for the body's end after ``[DONE]`` (it comes at once from
# a server that behaves): a server that holds the body open past it does not hold the
# finished call too; its connection is closed instead of reused.
_AFTER_DONE_S = 0.25

# What httpx raises for a request that fails or a stream that breaks while being read;
# aiohttp raises a ClientError (its timeouts are ServerTimeoutErrors, a kind of it).
_TRANSPORT_ERRORS = (httpx.HTTPError, httpx.StreamError, aiohttp.ClientError)


# Request fields the guard sets itself: a call's parameter may not replace them.
_GUARDED_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "max_completion_tokens"})


def _check_url(url: str) -> None:
    """Refuse a ``base_url`` no request could reach (``localhost:8000/v1`` lacks its
    scheme) at construction, instead of on the first call."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ConfigError("base_url is not a URL (it is not shown: it may hold a credential)") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"base_url must be an http:// or https:// URL with a host, got {_redacted(url)!r}")


# A URL's credentials (userinfo) in a message: aiohttp names a proxy by its whole URL.
_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")
# Request headers whose values are credentials.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})


def _describe(error: BaseException) -> str:
    """An exception as ``"Kind: message"`` (some httpx errors have no message), with any
    URL's credentials hidden."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return _USERINFO.sub("***@", text)


def _secrets(url: str, headers: Mapping[str, str]) -> tuple[str, ...]:
    """What a server must not see echoed into errors and ledger rows: the credentials in
    ``url`` and the values and tokens of the credential ``headers`` sent (a Basic
    Authorization made of the URL's credentials among them)."""
    parsed = httpx.URL(url)
    found = [secret for secret in (parsed.password, parsed.username if not parsed.password else None) if secret]
    for name, value in headers.items():
        if name.lower() in _CREDENTIAL_HEADERS:
            found += [value, value.partition(" ")[2]]
    return tuple(sorted({secret for secret in found if len(secret) >= 4}, key=len, reverse=True))


def _error(status: int, headers: Mapping[str, str], body: bytes, url: str, secrets: Sequence[str] = ()) -> BackendError:
    """An answer of ``status`` 300 or more, as the error that names it (and where a
    redirect pointed: the guard follows none, since a POST must not be resent), with
    ``secrets`` the server echoed hidden."""
    text = body[:500].decode("utf-8", "replace")
    for secret in secrets:
        text = text.replace(secret, "***")
    where = f" (to {headers['location']})" if headers.get("location") else ""
    return BackendError(f"POST {url} answered {status}{where}: {text}", status, text)


def _not_a_stream(status: int, headers: Mapping[str, str], body: bytes, url: str) -> BackendError | Chunk:
    """What a server that answered 2xx with something else than an event stream sent:
    a whole chat completion (a server that ignores ``stream``) as one chunk, or an
    error that names what came instead."""
    kind = headers.get("content-type", "")
    if kind.startswith("application/json"):
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if is_completion(answer):
            return chunk_from_completion(answer)
    text = body[:300].decode("utf-8", "replace")
    return BackendError(f"POST {url} answered {status} with {kind or 'no content type'}, "
                        f"not an event stream: {text}", status)


async def _closed_with_the_loop(
    session: aiohttp.ClientSession, forget: Callable[[], object]
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        forget()  # the session holds its loop: kept, neither would ever be collected
        await session.close()


_CLOSING: set[asyncio.Task[None]] = set()  # sessions being closed: a task nobody holds may be collected


def _close_on_its_loop(closer: AsyncGenerator[None, None]) -> None:
    """Close a session (its closer generator) on the running loop, in a task."""
    task = asyncio.ensure_future(closer.aclose())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


# Of an answer that is not a stream, the most bytes read (an error page can be endless).
_MOST_BODY_BYTES = 1 << 20


def _head(chunks: Iterator[bytes]) -> bytes:
    body = bytearray()
    for part in chunks:
        body += part
        if len(body) >= _MOST_BODY_BYTES:
            break
    return bytes(body[:_MOST_BODY_BYTES])


async def _ahead(chunks: AsyncIterator[bytes]) -> bytes:
    body = bytearray()
    async for part in chunks:
        body += part
        if len(body) >= _MOST_BODY_BYTES:
            break
    return bytes(body[:_MOST_BODY_BYTES])


def _events(parts: Iterator[bytes], url: str) -> Iterator[str]:
    """The data of each event in a body arriving in ``parts``."""
    stream = EventStream(url)
    for part in parts:
        yield from stream.feed(part)
    yield from stream.end()


async def _aevents(parts: AsyncIterator[bytes], url: str) -> AsyncIterator[str]:
    """The async twin of :func:`_events`."""
    stream = EventStream(url)
    async for part in parts:
        for data in stream.feed(part):
            yield data
    for data in stream.end():
        yield data


def _json_body(body: Mapping[str, Any]) -> bytes:
    """The request's JSON, ASCII-escaped (half of a UTF-16 pair, which UTF-8 cannot hold,
    goes as its escape, as on both transports alike); NaN is refused, being no JSON."""
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("ascii")


def _end_body_apart(response: httpx.Response, parts: Iterator[bytes]) -> None:
    """Read the rest of a finished answer's body (its end, which lets the connection be
    reused) and close it, in a thread of its own: a server that holds the body open after
    ``[DONE]`` holds up that thread, not the caller (httpx reads without a time bound
    but the read timeout). A daemon thread: the interpreter does not wait for it at exit."""

    def end() -> None:
        try:
            for _ in itertools.islice(parts, _AFTER_DONE):
                pass
        except (httpx.HTTPError, OSError):
            pass  # the answer was whole: a broken end takes nothing from it
        finally:
            response.close()

    threading.Thread(target=end, name="tokenguard-body-end", daemon=True).start()


async def _body_end(parts: AsyncIterator[bytes]) -> None:
    for _ in range(_AFTER_DONE):
        if await anext(parts, None) is None:
            return


def _is_stream(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").startswith("text/event-stream")


def _query_pairs(query: Mapping[str, object] | Sequence[tuple[str, object]]) -> tuple[tuple[str, str], ...]:
    """Query parameters as both transports send them: httpx's spelling of each value
    (``true``, ``""`` for None), a list or tuple as the parameter repeated; given as a
    mapping or as (name, value) pairs (another backend's ``query``)."""
    pairs = []
    for name, given in query.items() if isinstance(query, Mapping) else query:
        for value in given if isinstance(given, (list, tuple)) else [given]:
            if isinstance(value, bool):
                pairs.append((name, "true" if value else "false"))
            elif value is None:
                pairs.append((name, ""))
            elif isinstance(value, (str, int, float)):
                pairs.append((name, str(value)))
            else:
                raise ConfigError(f"query parameter {name!r} must be text, a number, a bool or None (or a list of "
                                  f"them), got {type(value).__name__}")
    return tuple(pairs)


def _redacted(url: str) -> str:
    """``url`` without its password or token (``http://svc:secret@host`` names a
    credential: errors, ledger rows and reprs must not)."""
    parsed = httpx.URL(url)
    if parsed.password:
        return str(parsed.copy_with(username=parsed.username, password="***"))
    return str(parsed.copy_with(username="***")) if parsed.username else url  # a token as the user


class _Read:
    """One streamed answer being read: turns its events into chunks, remembers whether
    one carried a ``finish_reason``, and words every failure with the URL.

    A stream is finished only by a ``finish_reason``: a server that aborts a generation
    (llama.cpp's does, under load) may still send ``[DONE]`` or close cleanly, and that
    must not read as an empty success.
    """

    __slots__ = ("answered", "finished", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        #: True once the server answered with a status below 400 and the events began.
        self.answered = False
        #: True once a chunk carried a finish_reason.
        self.finished = False

    def chunk(self, data: str) -> Chunk | None:
        """The chunk in one event's ``data``; ``None`` at ``[DONE]``, the end."""
        if data.strip() == "[DONE]":
            self.end("sent [DONE]")
            return None
        try:
            item = json.loads(data)
        except json.JSONDecodeError as error:
            raise BackendError(f"{self.url} sent an event that is not JSON: {data[:200]!r}") from error
        if isinstance(item, dict) and item.get("error"):
            raise BackendError(f"{self.url} reported an error mid-stream: {item['error']}")
        chunk = chunk_from_stream_item(item)
        self.finished = self.finished or chunk.finish_reason is not None
        return chunk

    def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> Chunk:
        """The one chunk of a 2xx answer that is no event stream: a whole chat completion
        (a server that ignores ``stream``); anything else raises, naming what came."""
        answer = _not_a_stream(status, headers, body, self.url)
        if isinstance(answer, BackendError):
            raise answer
        self.finished = answer.finish_reason is not None
        self.end("sent a whole answer")
        return answer

    def end(self, how: str) -> None:
        """The stream ended (``how``: what the server did); raise unless it finished."""
        if not self.finished:
            raise BackendError(
                f"{self.url}: the server {how} before it finished (no chunk carried a finish_reason)"
            )

    @contextlib.contextmanager
    def transport_errors(self) -> Iterator[None]:
        """Turn an httpx or aiohttp error raised in the block into a :class:`BackendError`
        that names the URL and the cause (chained), so every failure is a TokenGuardError."""
        try:
            yield
        except _TRANSPORT_ERRORS as error:
            if self.finished:
                return  # the answer was whole: a connection lost before [DONE] takes nothing from it
            timed_out = isinstance(error, (httpx.TimeoutException, aiohttp.ServerTimeoutError))
            kind = BackendTimeout if timed_out else BackendError
            if not self.answered:
                raise kind(f"POST {self.url} failed: {_describe(error)}") from error
            raise kind(f"the stream from {self.url} broke before it finished: {_describe(error)}") from error


class OpenAICompatible(Backend):
    """Stream chat completions from ``{base_url}/chat/completions``.

    Requests ``stream_options.include_usage`` so the server reports exact usage at the
    end of the stream; a stream the guard cuts short is metered by the guard's own count.
    ``tokenizer`` names what the guard meters with (default: ``model``'s tokenizer, when
    tokenguard knows it). ``max_tokens_param`` is ``"max_tokens"`` or, for OpenAI's
    reasoning models, ``"max_completion_tokens"``. ``api_key`` may be a function that
    returns the key (a token that expires: Azure AD's), asked for each request; an async
    one serves async calls only.

    Every failure raises :class:`~tokenguard.errors.BackendError` naming the URL: an
    error answer (with its ``status``), a refused connection, a timeout, a stream that
    breaks, and a stream that ends without a ``finish_reason``.

    >>> backend = OpenAICompatible("http://127.0.0.1:8000/v1", "gpt-4o-mini")
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | Callable[[], Any] | None = None,
        *,
        tokenizer: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, object] | Sequence[tuple[str, object]] | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_tokens_param: str = "max_tokens",
        include_usage: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        #: Query parameters sent with every request (Azure's ``api-version``, a gateway's key),
        #: as (name, value) pairs.
        self.query = _query_pairs(query or {})
        _check_url(self.base_url)
        self.url = f"{self.base_url}/chat/completions"
        #: The URL as errors, ledger rows and reprs show it (its password hidden).
        self.shown_url = _redacted(self.url)
        self._client_lock = threading.Lock()
        self.tokenizer_name = tokenizer
        self.max_tokens_param = max_tokens_param
        self.include_usage = include_usage
        self.headers = {"Accept": "text/event-stream", "Content-Type": "application/json", **(headers or {})}
        #: Where a key that changes comes from (a token provider), asked for each request.
        self._key_provider = api_key if callable(api_key) else None
        if api_key and not callable(api_key):
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = _DEFAULT_TIMEOUT if timeout is None else timeout
        self._client: httpx.Client | None = None
        self._target = Target(self.url)
        self._secrets = _secrets(self.url, self._target.headers(self.headers))
        # One aiohttp session per event loop (a session must not cross loops), with the
        # suspended generator that closes it as the loop shuts down.
        self._sessions: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, AsyncGenerator[None, None]]
        ] = weakref.WeakKeyDictionary()

    def cache_identity(self) -> object:
        """The server and the model: two servers may serve different models by one name."""
        return [self.name, self.base_url, self.model]

    def tokenizer(self) -> Tokenizer | None:
        from tokenguard.tokens import get_tokenizer

        try:
            return get_tokenizer(self.tokenizer_name or self.model)
        except UnknownTokenizer:
            if self.tokenizer_name:
                raise
            return None

    def check_params(self, params: Params) -> None:
        """The guard owns what it meters and caps: the model, the messages, streaming
        and the output cap (``max_tokens=``, sent as ``max_tokens_param``); a parameter
        that would replace one of them, or ask for several answers, is refused."""
        taken = sorted(_GUARDED_FIELDS & set(params))
        if taken:
            raise InvalidRequest(
                f"{', '.join(map(repr, taken))} would replace what the guard sends and meters; pass max_tokens= "
                "for the output cap (the backend sends it as its max_tokens_param), and the model and "
                "messages to the guard itself"
            )
        n = params.get("n")
        if n is not None and n != 1:
            raise InvalidRequest(f"n={n!r}: the guard meters one answer a call; make n calls instead")

    def _body(self, messages: Sequence[Message], params: Params) -> dict[str, Any]:
        body: dict[str, Any] = {k: v for k, v in params.items() if k != "max_tokens"}
        body.update(model=self.model, messages=list(messages), stream=True)  # the guard's own, last
        max_tokens = params.get("max_tokens")
        if max_tokens is not None:
            body[self.max_tokens_param] = max_tokens
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            with self._client_lock:  # threads calling first together share one client
                if self._client is None:
                    self._client = httpx.Client(timeout=self.timeout)
        return self._client

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        read = _Read(self.shown_url)
        body = _json_body(self._body(messages, params))
        client = self.client
        with read.transport_errors():
            headers, secrets = self._with_key(self._key_provider() if self._key_provider is not None else None)
            request = client.build_request("POST", self.url, content=body, params=self.query, headers=headers)
            r = client.send(request, stream=True)
            ended = False  # at [DONE], the body's end is left to a thread of its own
            try:
                if r.status_code >= 300:
                    raise _error(r.status_code, r.headers, _head(r.iter_bytes()), self.shown_url, secrets)
                read.answered = True
                if not _is_stream(r.headers):
                    yield read.whole(r.status_code, r.headers, _head(r.iter_bytes()))
                    return
                parts = r.iter_bytes()
                for data in _events(parts, self.shown_url):
                    chunk = read.chunk(data)
                    if chunk is None:
                        ended = True
                        _end_body_apart(r, parts)
                        return
                    yield chunk
                read.end("closed the stream")
            finally:
                if not ended:
                    r.close()

    def _with_key(self, key: object) -> tuple[dict[str, str], tuple[str, ...]]:
        """The request's headers, with the key a provider gave (``None``: no provider),
        and the secrets its errors must hide."""
        if key is None:
            return self.headers, self._secrets
        if inspect.isawaitable(key):
            getattr(key, "close", lambda: None)()  # never awaited: no "never awaited" warning
            raise ConfigError("the api_key provider is async: it serves async calls only (astream, acomplete)")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"the api_key provider must return a non-empty str, got {type(key).__name__}")
        return {**self.headers, "Authorization": f"Bearer {key}"}, (key, *self._secrets)

    async def _session(self) -> aiohttp.ClientSession:
        """This event loop's session (an aiohttp session must not cross loops). It is
        closed as its loop shuts down (``asyncio.run`` does at its end): a suspended
        async generator of the loop holds it, and the loop closes those then."""
        loop = asyncio.get_running_loop()
        held = self._sessions.get(loop)
        if held is None:
            session = new_session(self.url, self.timeout)
            closer = _closed_with_the_loop(session, lambda: self._sessions.pop(loop, None))
            await anext(closer)  # now the loop knows it, and closes it when it shuts down
            held = self._sessions[loop] = (session, closer)
        return held[0]

    async def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        read = _Read(self.shown_url)
        body = self._body(messages, params)
        with read.transport_errors():
            session, target = await self._session(), self._target
            key = self._key_provider() if self._key_provider is not None else None
            headers, secrets = self._with_key(await key if inspect.isawaitable(key) else key)
            async with session.post(target.url, data=_json_body(body), headers=target.headers(headers),
                                    params=self.query, allow_redirects=False) as r:
                if r.status >= 300:
                    raise _error(r.status, r.headers, await _ahead(r.content.iter_any()), self.shown_url,
                                 secrets)
                read.answered = True
                if not _is_stream(r.headers):
                    yield read.whole(r.status, r.headers, await _ahead(r.content.iter_any()))
                    return
                parts = r.content.iter_any()
                async for data in _aevents(parts, self.shown_url):
                    chunk = read.chunk(data)
                    if chunk is None:
                        with contextlib.suppress(asyncio.TimeoutError):  # the body's end: the connection is reused
                            await asyncio.wait_for(_body_end(parts), _AFTER_DONE_S)
                        return
                    yield chunk
                read.end("closed the stream")

    def close(self) -> None:
        """Close the sync HTTP client and the async sessions: each on its event loop,
        soon (a loop that has ended closed its own)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        for loop, (_, closer) in list(self._sessions.items()):
            self._sessions.pop(loop, None)
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # it closed meanwhile, and the session with it
                    loop.call_soon_threadsafe(_close_on_its_loop, closer)

    def __repr__(self) -> str:
        return f"OpenAICompatible({_redacted(self.base_url)!r}, {self.model!r})"
