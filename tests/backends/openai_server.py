"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

It speaks the real wire formats (JSON, and SSE with ``data: [DONE]``) over a real
socket. Behaviour by model name: ``"endless"`` ignores max_tokens and streams until
the client hangs up (bounded at 100,000 pieces); ``"fail"`` answers 500; ``"break"``
drops the connection after two pieces. Servers that stop a generation badly:
``"abort"`` sends the role chunk, then ``[DONE]`` with no finish_reason and hangs up
(llama.cpp's server under load); ``"cut"`` streams chunked and hangs up in the middle
of the body after two pieces (a transport error); ``"stall"`` sends the role chunk and
then nothing for ``STALL_S`` seconds. ``"nodone"`` finishes properly but closes without
``[DONE]``. ``"linger"`` answers in full, then holds the body open ``STALL_S`` before it ends it
(``lingered`` is set then). ``"tools"`` calls get_weather for Paris and Rome (two calls, their
arguments streamed in pieces and interleaved, as OpenAI streams parallel calls) unless
the last message is a tool's result, which it answers. ``"unauthorized"`` answers 401
quoting the request's Authorization header, as some servers do. Every request body is
kept in ``requests``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

REPLY_WORDS = ["Hello", " from", " the", " test", " server", "."]
PROMPT_TOKENS = 42  # what the server claims the prompt cost; the guard must report it
STALL_S = 2.0
TOOL_CITIES = ["Paris", "Rome"]  # what "tools" asks get_weather about  # how long "stall" keeps silent mid-stream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _chunked = False  # set per stream: whether the body is framed as HTTP chunks

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        self.server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
        # A proxy is sent the whole URL ("http://host/v1/..."): answer it as the host would.
        # Azure's path names the deployment.
        path = urlsplit(self.path).path
        if path != "/v1/chat/completions" and not re.fullmatch(r"/openai/deployments/[^/]+/chat/completions", path):
            return self._json(404, {"error": {"message": "not found"}})
        model = body.get("model")
        if model == "fail":
            return self._json(500, {"error": {"message": "model exploded"}})
        if model == "unauthorized":
            return self._json(401, {"error": {"message": f"Invalid credentials: {self.headers.get('Authorization')}"}})
        max_tokens = body.get("max_tokens") or 10_000
        words = REPLY_WORDS[:max_tokens]
        finish = "length" if len(words) < len(REPLY_WORDS) else "stop"
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": len(words),
            "total_tokens": PROMPT_TOKENS + len(words),
            "prompt_tokens_details": {"cached_tokens": 10},
        }
        if not body.get("stream"):
            return self._json(200, {
                "id": "x", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "finish_reason": finish}],
                "usage": usage,
            })
        self._chunked = model == "cut"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            if model == "endless":
                for _ in range(100_000):
                    self._event({"choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]})
                return
            if model == "abort":
                self._write(b"data: [DONE]\n\n")
                return self._hang_up()
            if model == "tools" and body["messages"][-1]["role"] != "tool":
                return self._tool_calls(body)
            if model == "stall":
                time.sleep(STALL_S)  # the client's read timeout fires first
                return
            for i, word in enumerate(words):
                if model in ("break", "cut") and i == 2:
                    return self._hang_up()
                last = i == len(words) - 1
                self._event({"choices": [{"index": 0, "delta": {"content": word},
                                          "finish_reason": finish if last else None}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event({"choices": [], "usage": usage})
            if model != "nodone":
                self._write(b"data: [DONE]\n\n")
            if model == "linger":
                time.sleep(STALL_S)
                self.server.lingered.set()
        except (BrokenPipeError, ConnectionResetError):
            self.server.hangups += 1

    def _tool_calls(self, body: dict[str, Any]) -> None:
        def delta(index: int, **part: Any) -> None:
            self._event({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **part}]},
                                      "finish_reason": None}]})

        for index in range(len(TOOL_CITIES)):
            delta(index, id=f"call_{index}", type="function", function={"name": "get_weather", "arguments": ""})
        for index in range(len(TOOL_CITIES)):
            delta(index, function={"arguments": '{"city": '})
        for index, city in enumerate(TOOL_CITIES):
            delta(index, function={"arguments": f'"{city}"}}'})
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event({"choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 20}})
        self._write(b"data: [DONE]\n\n")

    def _event(self, obj: dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        """Send ``data`` now, framed as one HTTP chunk when the body is chunked."""
        if self._chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

    def _hang_up(self) -> None:
        """Drop the connection now, without ending the body (no [DONE], no last chunk)."""
        self.wfile.flush()
        self.connection.shutdown(2)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.hangups = 0
        self.lingered = threading.Event()


class OpenAIServer:
    """Start with ``with OpenAIServer() as server:``; ``server.base_url`` ends in ``/v1``."""

    def __enter__(self) -> _Server:
        self.server = _Server()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.server.base_url = f"http://{host}:{port}/v1"  # type: ignore[attr-defined]
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
