"""OpenAICompatible reads a stream to the end of its body after ``[DONE]``, so an
HTTP/1.1 server's connection goes back to the pool: one connection for many calls,
sync and async, instead of one each (a busy gateway would run out of ports)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from tokenguard.backends import OpenAICompatible

EVENTS = [
    'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
    'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
    "data: [DONE]\n\n",
]


@pytest.fixture(scope="module")
def upstream():
    """A real HTTP/1.1 server (uvicorn) that streams a short answer and records the
    client port of every request."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    ports: list[int] = []

    async def chat(request):
        ports.append(request.scope["client"][1])

        async def events():
            for event in EVENTS:
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", ports
    server.should_exit = True
    thread.join(5)


def test_calls_share_one_connection(upstream):
    url, ports = upstream
    backend = OpenAICompatible(url, "gpt-4o-mini")
    messages = [{"role": "user", "content": "hello"}]
    ports.clear()
    for _ in range(10):
        assert "".join(c.text for c in backend.stream(messages, {"max_tokens": 5})) == "hi"
    assert len(ports) == 10 and len(set(ports)) == 1

    async def calls():
        for _ in range(10):
            assert "".join([c.text async for c in backend.astream(messages, {"max_tokens": 5})]) == "hi"

    ports.clear()
    asyncio.run(calls())
    assert len(ports) == 10 and len(set(ports)) == 1
    backend.close()
