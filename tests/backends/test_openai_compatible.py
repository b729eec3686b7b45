"""OpenAICompatible against a real HTTP server on 127.0.0.1 (SSE streaming, usage)."""

from __future__ import annotations

import asyncio
import base64
import re
import socket

import aiohttp
import httpx
import pytest
from openai_server import PROMPT_TOKENS, REPLY_WORDS, TOOL_CITIES

from tokenguard import Budget, Guard, TokenGuardError
from tokenguard.backends import BackendError, OpenAICompatible
from tokenguard.backends.sse import EventStream
from tokenguard.errors import BackendTimeout, ConfigError, InvalidRequest
from tokenguard.tokens import get_tokenizer

TOK = get_tokenizer("gpt-4o")
# The test server's pseudo-models.
FREE = {name: (0, 0) for name in ("endless", "fail", "break", "abort", "cut", "stall", "nodone")}
HI = [{"role": "user", "content": "hi"}]


def test_stream_reads_sse_and_final_usage(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "gpt-4o", api_key="sk-test")
    chunks = list(backend.stream([{"role": "user", "content": "hi"}], {"max_tokens": 100, "temperature": 0}))
    assert "".join(c.text for c in chunks) == "".join(REPLY_WORDS)
    assert chunks[-1].usage.input_tokens == PROMPT_TOKENS
    assert chunks[-1].usage.cached_input_tokens == 10
    request = openai_server.requests[-1]
    assert request["body"]["stream"] is True
    assert request["body"]["stream_options"] == {"include_usage": True}
    assert request["body"]["max_tokens"] == 100 and request["body"]["temperature"] == 0
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert backend.tokenizer().name  # gpt-4o is known offline


def test_guard_reports_the_servers_usage(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "gpt-4o"), max_output_tokens=100)
    reply = guard.complete("hi", user="u")
    assert reply.text == "".join(REPLY_WORDS) and reply.stop_reason == "stop"
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (
        PROMPT_TOKENS, len(REPLY_WORDS), 10,
    )
    assert reply.usage.cost_usd > 0
    row = guard.ledger.records()[0]
    assert row["backend"] == "openai" and row["model"] == "gpt-4o"


def test_server_side_length_and_max_completion_tokens(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "gpt-4o", max_tokens_param="max_completion_tokens")
    Guard(backend, max_output_tokens=3).complete("hi")
    assert openai_server.requests[-1]["body"]["max_completion_tokens"] == 3
    reply = Guard(OpenAICompatible(openai_server.base_url, "gpt-4o"), max_output_tokens=3).complete("hi")
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 3


def test_guard_cuts_a_server_that_ignores_max_tokens(openai_server):
    budget = Budget(tokens=1_000)
    backend = OpenAICompatible(openai_server.base_url, "endless", tokenizer="gpt-4o")
    guard = Guard(backend, max_output_tokens=25, budget=budget, prices=FREE)
    reply = guard.complete("go")  # the server would stream forever
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 25
    assert reply.usage.input_tokens == TOK.count_messages(reply.messages)  # our exact count
    assert budget.spent()["tokens"] == reply.usage.total_tokens
    guard.backend.close()


def test_a_looping_server_is_stopped_by_repetition_sync_and_async(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "endless", tokenizer="gpt-4o")
    guard = Guard(backend, max_output_tokens=500, prices=FREE)
    for reply in (guard.complete("go"), asyncio.run(guard.acomplete("go"))):
        assert reply.stop_reason == "repetition" and reply.text == " word"  # one copy kept
        assert 0 < reply.usage.output_tokens < 500 and reply.usage.saved_tokens == 500 - reply.usage.output_tokens
    guard.backend.close()


def test_http_error_is_raised_and_metered(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "fail", tokenizer="gpt-4o")
    guard = Guard(backend, budget=Budget(tokens=10_000), prices=FREE)
    with pytest.raises(BackendError) as info:
        guard.complete("hi")
    assert info.value.status == 500 and "model exploded" in str(info.value)
    row = guard.ledger.records()[0]
    assert row["stop_reason"] == "error" and row["input_tokens"] == 0
    assert guard.budgets[0].spent()["reserved_tokens"] == 0


def test_broken_stream_keeps_what_was_seen(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "break", tokenizer="gpt-4o"), prices=FREE)
    stream = guard.stream("hi")
    pieces = []
    with pytest.raises(BackendError, match="before it finished"):
        for piece in stream:
            pieces.append(piece)
    # The server hung up without [DONE]; whatever arrived is metered.
    row = guard.ledger.records()[0]
    assert row["stop_reason"] == "error"
    assert pieces and row["output_tokens"] == TOK.count("".join(pieces))


def test_async_stream(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "gpt-4o"))

    async def run():
        s = guard.astream("hi")
        pieces = [p async for p in s]
        r2 = await guard.acomplete("again")
        return pieces, s.reply, r2

    pieces, reply, again = asyncio.run(run())
    assert "".join(pieces) == reply.text == "".join(REPLY_WORDS)
    assert reply.usage.input_tokens == PROMPT_TOKENS and again.usage.output_tokens == len(REPLY_WORDS)


def _events(*parts: bytes) -> list[str]:
    stream = EventStream("http://x")
    return [data for part in parts for data in stream.feed(part)] + stream.end()


def test_event_stream_rules():
    body = b': comment\nevent: message\ndata: {"a":\ndata: 1}\n\ndata: [DONE]\n\n'
    assert _events(body) == ['{"a":\n1}', "[DONE]"]
    assert _events(b"data:x\n") == ["x"]  # an event the body's end leaves open
    assert _events(b'data: {"a": 1}\n\ndata: {"b"') == ['{"a": 1}']  # cut inside a line: that event is not whole
    assert _events(b"\xef\xbb", b"\xbfdata: a\n\n") == ["a"]  # a byte-order mark, even split, is skipped
    # Lines end at \n, \r\n or \r wherever the chunks fall: a "\r\n" torn between two
    # chunks is one break (not a line and a blank one that would end the event early).
    assert _events(b"data: a\r", b"\ndata: b\r\r", b"data: c\n", b"\n") == ["a\nb", "c"]
    assert _events(b"data: a\r", b"\r") == ["a"]  # a held "\r" is a break when the next holds none
    assert _events(b"data: \xc3", b"\xa9t\xc3\xa9\r\n\r\n") == ["été"]  # a character split between chunks
    with pytest.raises(BackendError, match="a line of over"):
        _events(*[b"x" * (1 << 20)] * 9)


def test_unknown_model_tokenizer_asks_for_one(openai_server):
    from tokenguard.errors import UnknownTokenizer

    guard = Guard(OpenAICompatible(openai_server.base_url, "llama3-house"))
    with pytest.raises(UnknownTokenizer, match="tokenizer="):
        guard.complete("hi")
    assert openai_server.requests == []  # refused before anything was sent


# A server that stops a generation badly: each stream ends without a finish_reason.
UNFINISHED = {
    "abort": r"sent \[DONE\] before it finished",  # role chunk, [DONE], hang-up (llama.cpp)
    "break": "closed the stream before it finished",  # two pieces, then a clean EOF
    "cut": "broke before it finished: {torn}",  # two pieces, then a torn body
}
# What each transport raises underneath (sync calls go through httpx, async ones aiohttp).
CAUSES = {
    False: {"torn": httpx.RemoteProtocolError, "refused": httpx.ConnectError, "timeout": httpx.ReadTimeout},
    True: {"torn": aiohttp.ClientPayloadError, "refused": aiohttp.ClientConnectorError,
           "timeout": aiohttp.SocketTimeoutError},
}


def _drain(backend, asynchronous, messages=HI):
    """Read one whole stream from ``backend``, sync or async; the chunks."""
    if not asynchronous:
        return list(backend.stream(messages, {}))

    async def read():
        return [chunk async for chunk in backend.astream(messages, {})]

    return asyncio.run(read())


def _closed_port_url():
    """A base URL on 127.0.0.1 where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("model", sorted(UNFINISHED))
def test_a_stream_that_never_finished_raises(openai_server, model, asynchronous):
    backend = OpenAICompatible(openai_server.base_url, model, tokenizer="gpt-4o")
    said = UNFINISHED[model].format(torn=CAUSES[asynchronous]["torn"].__name__)
    with pytest.raises(BackendError, match=said) as info:
        _drain(backend, asynchronous)
    assert backend.url in str(info.value) and info.value.status is None


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_a_finished_stream_may_end_without_done(openai_server, include_usage, asynchronous):
    # finish_reason, then (with include_usage) a usage-only chunk, then EOF without [DONE].
    backend = OpenAICompatible(openai_server.base_url, "nodone", tokenizer="gpt-4o", include_usage=include_usage)
    chunks = _drain(backend, asynchronous)
    assert "".join(c.text for c in chunks) == "".join(REPLY_WORDS)
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert (chunks[-1].usage is not None) == include_usage


def test_an_aborted_stream_is_an_error_row_and_frees_the_budget(openai_server):
    budget = Budget(tokens=10_000)
    guard = Guard(OpenAICompatible(openai_server.base_url, "abort", tokenizer="gpt-4o"), budget=budget, prices=FREE)
    with pytest.raises(BackendError, match="finish_reason"):
        guard.complete("hi", user="u")
    row = guard.ledger.records()[0]
    assert row["stop_reason"] == "error" and "[DONE]" in row["error"]
    assert row["input_tokens"] == 0  # the server produced nothing: nothing is billed
    assert budget.spent() == {"tokens": 0, "usd": 0, "reserved_tokens": 0, "reserved_usd": 0}


def test_concurrent_async_calls_to_an_aborting_server_all_fail(openai_server):
    # The report: four concurrent acomplete calls against llama.cpp's server, three of
    # them recorded as empty successes.
    budget = Budget(tokens=100_000)
    guard = Guard(OpenAICompatible(openai_server.base_url, "abort", tokenizer="gpt-4o"), budget=budget, prices=FREE)

    async def run():
        return await asyncio.gather(*(guard.acomplete(f"q{i}") for i in range(4)), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, BackendError) for r in results), results
    rows = guard.ledger.records()
    assert len(rows) == 4 and all(r["stop_reason"] == "error" and r["error"] for r in rows)
    assert budget.spent()["reserved_tokens"] == 0 and budget.spent()["tokens"] == 0


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_torn_stream_is_metered_for_what_was_seen(openai_server, asynchronous):
    budget = Budget(tokens=10_000)
    guard = Guard(OpenAICompatible(openai_server.base_url, "cut", tokenizer="gpt-4o"), budget=budget, prices=FREE)
    with pytest.raises(BackendError, match="broke before it finished") as info:
        asyncio.run(guard.acomplete("hi")) if asynchronous else guard.complete("hi")
    assert isinstance(info.value.__cause__, CAUSES[asynchronous]["torn"])
    row = guard.ledger.records()[0]
    assert row["stop_reason"] == "error" and row["output_tokens"] == TOK.count("".join(REPLY_WORDS[:2]))
    assert budget.spent()["reserved_tokens"] == 0 and budget.spent()["tokens"] == row["input_tokens"] + row[
        "output_tokens"
    ]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_refused_connection_is_a_backend_error_naming_the_url(asynchronous):
    budget = Budget(tokens=10_000)
    backend = OpenAICompatible(_closed_port_url(), "gpt-4o")
    guard = Guard(backend, budget=budget)
    with pytest.raises(BackendError) as info:
        asyncio.run(guard.acomplete("hi")) if asynchronous else guard.complete("hi")
    assert isinstance(info.value, TokenGuardError) and info.value.status is None
    refused = CAUSES[asynchronous]["refused"]
    assert isinstance(info.value.__cause__, refused)
    assert f"POST {backend.url} failed: {refused.__name__}" in str(info.value)
    assert guard.ledger.records()[0]["stop_reason"] == "error"
    assert budget.spent()["reserved_tokens"] == 0 and budget.spent()["tokens"] == 0


@pytest.mark.parametrize("timeout", [0.2, httpx.Timeout(10.0, read=0.2)], ids=["seconds", "httpx-timeout"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_read_timeout_is_a_backend_error(openai_server, asynchronous, timeout):
    backend = OpenAICompatible(openai_server.base_url, "stall", tokenizer="gpt-4o", timeout=timeout)
    timeout = CAUSES[asynchronous]["timeout"]
    with pytest.raises(BackendTimeout, match=f"broke before it finished: {timeout.__name__}") as info:
        _drain(backend, asynchronous)
    assert isinstance(info.value.__cause__, timeout) and backend.url in str(info.value)


def test_a_wrong_path_keeps_its_status(openai_server):
    backend = OpenAICompatible(openai_server.base_url + "/nope", "gpt-4o")
    with pytest.raises(BackendError, match="answered 404") as info:
        Guard(backend).complete("hi")
    assert info.value.status == 404


@pytest.mark.parametrize("url", ["localhost:8000/v1", "127.0.0.1:8000/v1", "ftp://host/v1", "http://[::1/v1"])
def test_a_base_url_no_request_could_reach_is_refused_at_once(url):
    with pytest.raises(ConfigError, match="base_url"):
        OpenAICompatible(url, "gpt-4o")


def _answering(status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None,
               cut_after: bool = False):
    """A server on 127.0.0.1 that answers every POST with this, as servers in the wild do."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if cut_after:  # a chunked stream whose connection drops before its end
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://user:s3cret@127.0.0.1:{server.server_address[1]}/v1"


@pytest.mark.parametrize("run", ["sync", "async"])
def test_answers_that_are_not_event_streams(run):
    def complete(url):
        guard = Guard(OpenAICompatible(url, "gpt-4o-mini"))
        return guard.complete("hi") if run == "sync" else asyncio.run(guard.acomplete("hi"))

    whole = (b'{"choices":[{"index":0,"message":{"content":"Hello"},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":30,"completion_tokens":2}}')
    server, url = _answering(200, "application/json", whole)  # a server that ignores stream=true
    reply = complete(url)
    assert (reply.text, reply.usage.input_tokens, reply.usage.output_tokens) == ("Hello", 30, 2)
    server.shutdown()
    for status, kind, body, headers, said in (
        (200, "text/html", b"<html>nginx welcome</html>", {}, "200 with text/html, not an event stream"),
        (307, "text/plain", b"", {"Location": "https://elsewhere/v1/chat/completions"}, "307 (to https://elsewhere"),
    ):
        server, url = _answering(status, kind, body, headers)
        with pytest.raises(BackendError, match=re.escape(said)) as failed:
            complete(url)
        assert "s3cret" not in str(failed.value) and "user:***@" in str(failed.value)  # no credential shown
        server.shutdown()
    finished = (b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\n'
                b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1}}\n\n')
    server, url = _answering(200, "text/event-stream", finished, cut_after=True)  # no [DONE]: the line drops
    reply = complete(url)
    assert (reply.text, reply.stop_reason, reply.usage.output_tokens) == ("Hi", "stop", 1)
    server.shutdown()


def test_an_event_loop_s_client_closes_as_the_loop_shuts_down(openai_server):
    backend = OpenAICompatible(openai_server.base_url, "gpt-4o-mini")
    guard = Guard(backend)
    clients = []

    async def call() -> None:
        await guard.acomplete("hi")
        clients.append(await backend._session())

    for _ in range(3):  # an application that runs asyncio.run per request
        asyncio.run(call())
    # Each loop's client (its pooled connections) closed as asyncio.run shut the loop down,
    # not whenever the garbage collector gets to it.
    assert len({id(client) for client in clients}) == 3 and all(client.closed for client in clients)
    assert not backend._sessions  # and was let go: a session holds its loop


@pytest.mark.parametrize("run", ["sync", "async"])
def test_an_event_stream_with_carriage_return_line_breaks(run):
    stream = (b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\r\r'
              b'data: {"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"stop"}]}\r\r'
              b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\r\rdata: [DONE]\r\r')
    server, url = _answering(200, "text/event-stream", stream)
    guard = Guard(OpenAICompatible(url, "gpt-4o-mini"))
    reply = guard.complete("hi") if run == "sync" else asyncio.run(guard.acomplete("hi"))
    assert (reply.text, reply.stop_reason, reply.usage.output_tokens) == ("Hi there", "stop", 2)
    server.shutdown()


@pytest.mark.parametrize("scheme", ["http://", ""], ids=["url", "host-port"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_the_environment_s_proxy_is_used_unless_no_proxy_names_the_host(openai_server, monkeypatch, asynchronous,
                                                                       scheme):
    proxy = openai_server.base_url.removesuffix("/v1").replace("http://", scheme)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("NO_PROXY", "")
    # A host no resolver knows: only the proxy (the test server) can answer for it.
    chunks = _drain(OpenAICompatible("http://llm.invalid/v1", "gpt-4o", tokenizer="gpt-4o"), asynchronous)
    assert "".join(c.text for c in chunks) == "".join(REPLY_WORDS)
    assert openai_server.requests[-1]["path"] == "http://llm.invalid/v1/chat/completions"
    monkeypatch.setenv("HTTP_PROXY", _closed_port_url().removesuffix("/v1"))  # a proxy that refuses all
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{openai_server.server_address[1]}")  # an entry may name the port
    chunks = _drain(OpenAICompatible(openai_server.base_url, "gpt-4o", tokenizer="gpt-4o"), asynchronous)
    assert "".join(c.text for c in chunks) == "".join(REPLY_WORDS)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_chat_keeps_the_tools_an_answer_called_for_their_results(openai_server, asynchronous):
    guard = Guard(OpenAICompatible(openai_server.base_url, "tools", tokenizer="gpt-4o"), prices={"tools": (0, 0)})

    def chat(turn):
        return asyncio.run(guard.achat(turn, session="s")) if asynchronous else guard.chat(turn, session="s")

    asked = chat("What is the weather in Paris and Rome?")
    assert (asked.text, asked.stop_reason) == ("", "tool_calls")
    assert asked.tool_calls == [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
        for i, city in enumerate(TOOL_CITIES)
    ]
    results = [{"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"} for call in asked.tool_calls]
    answered = chat(results)  # both results in one turn: each call is answered before the model speaks
    assert (answered.text, answered.stop_reason, answered.tool_calls) == ("".join(REPLY_WORDS), "stop", None)
    sent = openai_server.requests[-1]["body"]["messages"]
    assert sent == [{"role": "user", "content": "What is the weather in Paris and Rome?"},
                    {"role": "assistant", "content": "", "tool_calls": asked.tool_calls}, *results]
    assert guard.history.get("s") == [*sent, {"role": "assistant", "content": answered.text}]
    asked.tool_calls.clear()  # the reply and the turn are the caller's: the history keeps its own copies
    results[0]["content"] = "changed"
    assert guard.history.get("s")[1:3] == sent[1:3] and sent[1]["tool_calls"] != [] and sent[2]["content"] != "changed"


def test_a_chat_turn_must_be_text_or_messages():
    guard = Guard(lambda messages, max_tokens: "hi", model="gpt-4o")
    for turn, said in (([], "empty"), (7, "got int"), ([{"content": "no role"}], "no 'role'")):
        with pytest.raises(InvalidRequest, match=said):
            guard.chat(turn, session="s")
    assert guard.history.get("s") == [] and guard.ledger.records() == []


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_both_transports_send_the_same_request(openai_server, asynchronous):
    # Credentials in the URL are Basic auth (in place of the key's header), query values
    # are spelled as httpx spells them, and NaN is refused (it is no JSON).
    url = openai_server.base_url.replace("http://", "http://svc:pa%40ss@")
    backend = OpenAICompatible(url, "gpt-4o", api_key="sk-test",
                               query={"debug": True, "x": None, "n": 3, "tag": ["a", "b"]})
    assert "".join(c.text for c in _drain(backend, asynchronous)) == "".join(REPLY_WORDS)
    request = openai_server.requests[-1]
    assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(b"svc:pa@ss").decode()
    assert request["path"] == "/v1/chat/completions?debug=true&x=&n=3&tag=a&tag=b"
    assert OpenAICompatible(url, "gpt-4o", query=backend.query).query == backend.query  # pairs are taken too
    with pytest.raises(ValueError, match="JSON"):
        if asynchronous:
            asyncio.run(anext(backend.astream(HI, {"temperature": float("nan")})))
        else:
            next(backend.stream(HI, {"temperature": float("nan")}))
    with pytest.raises(ConfigError, match="query parameter 'tags'"):
        OpenAICompatible(openai_server.base_url, "gpt-4o", query={"tags": [{"a": "b"}]})


def test_async_calls_name_a_socks_proxy_they_cannot_use(openai_server, monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(ConfigError, match="not SOCKS"):
        _drain(OpenAICompatible(openai_server.base_url, "gpt-4o"), asynchronous=True)


def test_tool_calls_left_unanswered_are_not_sent_again(openai_server):
    guard = Guard(OpenAICompatible(openai_server.base_url, "tools", tokenizer="gpt-4o"), prices={"tools": (0, 0)})
    asked = guard.chat("What is the weather in Paris and Rome?", session="s")
    paris, rome = asked.tool_calls
    guard.chat([{"role": "tool", "tool_call_id": paris["id"], "content": "18 C"}], session="s")  # Rome's unanswered
    assert openai_server.requests[-1]["body"]["messages"][1]["tool_calls"] == [paris]
    guard.chat("Never mind the weather.", session="s")
    sent = openai_server.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[1]["tool_calls"] == [paris]  # OpenAI refuses a call no tool message answers
    assert guard.history.get("s")[1]["tool_calls"] == [paris, rome]  # the history keeps what was said


def test_a_call_prepared_by_hand_may_still_name_its_turn_as_one_message():
    guard = Guard(lambda messages, max_tokens: "Hello.", model="gpt-4o")
    turn = {"role": "user", "content": "Hi"}
    call = guard.prepare([turn], session="s")
    call.turn = turn  # as chat() did before a turn could be several messages
    assert guard.open_stream(call).read().text == "Hello."
    assert guard.history.get("s") == [turn, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_call_ends_at_done_though_the_server_holds_the_body_open(openai_server, asynchronous):
    # A sync call read on to the body's end: a guard's timeout turned a whole answer into an error.
    backend = OpenAICompatible(openai_server.base_url, "linger", tokenizer="gpt-4o")
    chunks = _drain(backend, asynchronous)
    assert "".join(c.text for c in chunks) == "".join(REPLY_WORDS)
    assert not openai_server.lingered.is_set()  # it returned while the server still held the body
    guard = Guard(backend, timeout=1.0, prices={"linger": (0.0, 0.0)})
    if not asynchronous:  # the next call, with a guard's timeout shorter than the server's hold
        assert guard.complete("hi").stop_reason == "stop"
    assert openai_server.lingered.wait(10)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_credentials_a_server_echoes_are_hidden_in_errors(openai_server, asynchronous):
    # The error's text goes to the exception, the ledger row and the gateway's client.
    keyed = OpenAICompatible(openai_server.base_url, "unauthorized", api_key="sk-live-SECRET123")
    with pytest.raises(BackendError, match="answered 401") as failed:
        _drain(keyed, asynchronous)
    assert "SECRET" not in str(failed.value) and "SECRET" not in failed.value.detail
    basic = base64.b64encode(b"svc:pw-SECRET").decode()
    in_url = OpenAICompatible(openai_server.base_url.replace("http://", "http://svc:pw-SECRET@"), "unauthorized")
    with pytest.raises(BackendError, match="answered 401") as failed:
        _drain(in_url, asynchronous)
    assert "SECRET" not in str(failed.value) and basic not in str(failed.value)


def test_a_proxy_s_credentials_are_hidden_in_errors():
    from tokenguard.backends.openai_compatible import _describe

    error = RuntimeError("407, message='Proxy Authentication Required', url='http://user:S3CRET@127.0.0.1:3128'")
    assert "S3CRET" not in _describe(error) and "http://***@127.0.0.1:3128" in _describe(error)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_half_a_utf16_pair_in_a_prompt_is_sent_as_its_escape(openai_server, asynchronous):
    # The sync transport raised UnicodeEncodeError (no TokenGuardError); async sent it escaped.
    backend = OpenAICompatible(openai_server.base_url, "gpt-4o")
    _drain(backend, asynchronous, messages=[{"role": "user", "content": "caf\ud800e"}])
    assert openai_server.requests[-1]["body"]["messages"][0]["content"] == "caf\ud800e"


def test_close_closes_the_async_sessions_of_running_loops(openai_server):
    # A server that builds and closes guards on one long-lived loop kept every session.
    async def main():
        backend = OpenAICompatible(openai_server.base_url, "gpt-4o")
        [chunk async for chunk in backend.astream(HI, {})]
        [(session, _)] = backend._sessions.values()
        backend.close()
        for _ in range(100):
            if session.closed:
                break
            await asyncio.sleep(0.01)
        return session.closed, len(backend._sessions)

    assert asyncio.run(main()) == (True, 0)
