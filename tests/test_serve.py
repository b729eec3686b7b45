"""`tokenguard serve`: the OpenAI-compatible gateway, driven by the official `openai`
client (and raw httpx where a client would not send such a request) over real HTTP on
127.0.0.1, against a real Guard: function backends, the test upstream server
(tests/backends/openai_server.py) behind `OpenAICompatible`, and once the bundled model.

Every number a client is told is checked against the guard's exact count and the
ledger row the call left. Waits are bounded polls for an event (a ledger row, a closed
generator), never thresholds on how long something took."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from backends.openai_server import PROMPT_TOKENS, REPLY_WORDS, OpenAIServer  # noqa: E402

import tokenguard as tg  # noqa: E402
from tokenguard.backends import Function, OpenAICompatible  # noqa: E402
from tokenguard.cache import ExactCache  # noqa: E402
from tokenguard.cli import main  # noqa: E402
from tokenguard.errors import ConfigError  # noqa: E402
from tokenguard.serve import KeyFile, add_key, create_app, hash_key  # noqa: E402
from tokenguard.serve.server import listen  # noqa: E402

MODEL = "gpt-4o"
REPLY = "PagedAttention keeps the KV cache in fixed-size blocks."
PIECES = re.findall(r"\S+\s*", REPLY)
QUESTION = [{"role": "user", "content": "What is PagedAttention?"}]
FREE = {"fail": (0.0, 0.0), "break": (0.0, 0.0), "endless": (0.0, 0.0)}  # the test server's models


async def answer(messages, max_tokens, **params):
    """A fast async backend: the same reply, word by word."""
    for piece in PIECES:
        yield piece


class Endless:
    """An async backend that streams " word" until it is closed, and says when it was."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.pieces = 0

    async def __call__(self, messages, max_tokens, **params):
        try:
            while True:
                self.pieces += 1
                yield " word"
                await asyncio.sleep(0.002)
        finally:
            self.closed.set()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``condition`` until it is truthy (a bound against hanging, not a measure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@dataclass
class Served:
    """A gateway running on 127.0.0.1: its base URL and the guard it serves."""

    url: str
    guard: tg.Guard

    def client(self, key: str = "unused", **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **options)

    def metrics(self, **expected: float) -> dict[str, float]:
        """The samples of ``GET /metrics``, once those named in ``expected`` (``name=value``,
        the name with its labels passed as ``**{...}``) have those values: a request is
        counted after its last byte is sent, so just after the client has it."""

        def scrape() -> dict[str, float] | None:
            response = httpx.get(f"{self.url}/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            samples = parse_metrics(response.text)
            return samples if all(samples.get(k) == v for k, v in expected.items()) else None

        return wait_until(scrape, f"the metrics {expected}")


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@contextlib.contextmanager
def serving(guard: tg.Guard, **options: Any) -> Iterator[Served]:
    """``create_app(guard, **options)`` served by uvicorn in a thread on a free port."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(guard, **options), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
        assert server.started, "the gateway did not start"
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", guard)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def keys(tmp_path) -> tuple[Path, dict[str, str]]:
    """A key file with a key for alice and one for bob: (path, {user: key})."""
    path = tmp_path / "keys.jsonl"
    return path, {user: add_key(path, user) for user in ("alice", "bob")}


def exact(text_or_messages: Any) -> int:
    return tg.count_tokens(text_or_messages, model=MODEL)


# -- answers and their usage ---------------------------------------------------------------


def test_a_chat_completion_reports_the_guards_exact_counts_and_its_ledger_row(keys):
    path, key = keys
    with serving(tg.Guard(answer, model=MODEL), keys=KeyFile(path)) as served:
        completion = served.client(key["alice"]).chat.completions.create(model=MODEL, messages=QUESTION)
    [row] = served.guard.ledger.records()
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL and completion.object == "chat.completion"
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (exact(QUESTION), exact(REPLY))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert completion.id == f"chatcmpl-{row['request_id']}"
    assert row["user"] == "alice"  # the key's user
    assert (row["input_tokens"], row["output_tokens"], row["stop_reason"]) == (
        usage.prompt_tokens, usage.completion_tokens, "stop")
    assert completion.tokenguard["cost_usd"] == row["cost_usd"] > 0
    assert completion.tokenguard["request_id"] == row["request_id"]


def test_a_stream_sends_pieces_then_the_finish_and_the_usage_it_was_asked_for(keys):
    path, key = keys
    with serving(tg.Guard(answer, model=MODEL), keys=KeyFile(path)) as served:
        client = served.client(key["bob"])
        chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True,
                                                     stream_options={"include_usage": True}))
        plain = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True))
    rows = served.guard.ledger.records()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id == f"chatcmpl-{rows[0]['request_id']}"
    *_, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (
        exact(QUESTION), exact(REPLY)) == (rows[0]["input_tokens"], rows[0]["output_tokens"])
    assert all(c.usage is None for c in plain)  # not asked for
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == REPLY
    assert [r["user"] for r in rows] == ["bob", "bob"]


def test_legacy_completions_send_the_prompt_as_one_user_message():
    prompt = "Say something about KV caches."
    with serving(tg.Guard(answer, model=MODEL)) as served:
        client = served.client()
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=100)
        streamed = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                  stream_options={"include_usage": True}))
    rows = served.guard.ledger.records()
    assert completion.object == "text_completion" and completion.choices[0].text == REPLY
    assert completion.usage.prompt_tokens == exact([{"role": "user", "content": prompt}]) == rows[0]["input_tokens"]
    assert completion.id == f"cmpl-{rows[0]['request_id']}"
    assert "".join(c.choices[0].text for c in streamed if c.choices) == REPLY
    assert streamed[-1].usage.completion_tokens == exact(REPLY) == rows[1]["output_tokens"]


def test_models_health_and_an_unknown_model(keys):
    path, key = keys
    with serving(tg.Guard(answer, model=MODEL), keys=KeyFile(path)) as served:
        client = served.client(key["alice"])
        assert [m.id for m in client.models.list()] == [MODEL]
        assert client.models.retrieve(MODEL).id == MODEL
        health = httpx.get(f"{served.url}/health")
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-17", messages=QUESTION)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-17")
        no_route = httpx.get(f"{served.url}/v2/everything")
        slashed = httpx.post(f"{served.url}/v1/chat/completions/", headers={"authorization": f"Bearer {key['alice']}"},
                             json={"model": MODEL, "messages": QUESTION})
        metrics = served.metrics()
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": MODEL}
    # One label for every model's page; anything else is "other", however many paths a scan tries.
    assert metrics['tokenguard_http_requests_total{endpoint="/v1/models/{model}",status="200"}'] == 1
    assert metrics['tokenguard_http_requests_total{endpoint="/v1/models/{model}",status="404"}'] == 1
    assert metrics['tokenguard_http_requests_total{endpoint="other",status="404"}'] == 2
    assert missing.value.code == "model_not_found" and "this gateway serves 'gpt-4o'" in missing.value.message
    assert no_route.status_code == 404 and no_route.json()["error"]["code"] == "not_found"
    # Not Starlette's empty redirect (a POST the client would have to send again): the route, named.
    assert slashed.status_code == 404 and "the route is /v1/chat/completions" in slashed.json()["error"]["message"]
    assert served.guard.ledger.records() == []


# -- who may call and what they may spend --------------------------------------------------


def test_a_bad_or_missing_key_is_401_and_reaches_nothing(keys):
    path, key = keys
    with serving(tg.Guard(answer, model=MODEL), keys=KeyFile(path)) as served:
        with pytest.raises(openai.AuthenticationError) as bad:
            served.client("tg-not-a-key").chat.completions.create(model=MODEL, messages=QUESTION)
        with pytest.raises(openai.AuthenticationError):
            served.client("tg-not-a-key").models.list()
        bare = httpx.post(f"{served.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
        # The hash of a key is not a key.
        hashed = httpx.post(f"{served.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION},
                            headers={"authorization": f"Bearer {hash_key(key['alice'])}"})
        metrics = served.metrics()
    assert bad.value.status_code == 401 and bad.value.code == "invalid_api_key"
    assert bare.status_code == hashed.status_code == 401
    assert bare.json()["error"]["message"].startswith("no API key was given")
    assert bare.headers["www-authenticate"] == "Bearer"
    assert served.guard.ledger.records() == []
    assert metrics['tokenguard_refusals_total{reason="unauthorized"}'] == 4


def test_a_spent_budget_is_429_for_that_user_only(keys):
    path, key = keys
    cap = 16
    worst = exact(QUESTION) + cap  # what one call reserves
    guard = tg.Guard(answer, model=MODEL, max_output_tokens=cap, budget=tg.Budget(tokens=worst, per="user"))
    with serving(guard, keys=KeyFile(path)) as served:
        alice, bob = served.client(key["alice"]), served.client(key["bob"])
        first = alice.chat.completions.create(model=MODEL, messages=QUESTION)
        with pytest.raises(openai.RateLimitError) as refused:
            alice.chat.completions.create(model=MODEL, messages=QUESTION)
        with pytest.raises(openai.RateLimitError):  # refused before any event is sent
            alice.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
        assert bob.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content == REPLY
        metrics = served.metrics(**{'tokenguard_http_requests_total{endpoint="/v1/chat/completions",status="429"}': 2})
    error = refused.value
    assert error.status_code == 429 and error.code == "insufficient_quota" and error.type == "insufficient_quota"
    left = worst - first.usage.total_tokens
    assert error.body["message"] == f"your token budget is spent: this request needs up to {worst} tokens, {left} left"
    assert error.response.headers["x-should-retry"] == "false"  # the openai client must not retry it
    assert error.response.headers["content-type"] == "application/json"
    rows = served.guard.ledger.records(user="alice")
    assert [r["stop_reason"] for r in rows] == ["stop", "budget_exceeded", "budget_exceeded"]
    assert rows[1]["request_id"] == error.response.headers["x-request-id"]
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (0, 0)
    assert metrics['tokenguard_refusals_total{reason="budget_exceeded"}'] == 2


def test_a_windowed_budget_says_when_it_renews():
    guard = tg.Guard(answer, model=MODEL, budget=tg.Budget(tokens=5, per="global", window="day"))
    with serving(guard) as served, pytest.raises(openai.RateLimitError) as refused:
        served.client().chat.completions.create(model=MODEL, messages=QUESTION)
    headers = refused.value.response.headers
    assert refused.value.body["message"].startswith("the gateway's token budget is spent this day: ")
    assert 0 < int(headers["retry-after"]) <= 24 * 3600 and headers["x-should-retry"] == "false"


def test_a_per_user_budget_on_an_open_gateway_needs_the_user_field():
    guard = tg.Guard(answer, model=MODEL, budget=tg.Budget(tokens=10_000, per="user"))
    with serving(guard) as served:
        with pytest.raises(openai.BadRequestError) as anonymous:
            served.client().chat.completions.create(model=MODEL, messages=QUESTION)
        named = served.client().chat.completions.create(model=MODEL, messages=QUESTION, user="carol")
    assert "budget is per user" in anonymous.value.message and "'user' field" in anonymous.value.message
    assert named.choices[0].message.content == REPLY
    assert [r["user"] for r in served.guard.ledger.records()] == ["carol"]


def test_an_open_gateway_takes_the_user_field_a_session_header_and_metadata_as_tags():
    with serving(tg.Guard(answer, model=MODEL)) as served:
        served.client().chat.completions.create(
            model=MODEL, messages=QUESTION, user="carol", metadata={"team": "search"},
            extra_headers={"X-Session-Id": "chat-1"})
        served.client().chat.completions.create(model=MODEL, messages=QUESTION)
        for user, session in (("a/b", "c"), ("a", "b/c")):  # two users' sessions, never one
            served.client().chat.completions.create(model=MODEL, messages=QUESTION, user=user,
                                                    extra_headers={"X-Session-Id": session})
    first, anonymous, slashed, plain = served.guard.ledger.records()
    assert (first["user"], first["session"], first["tags"]) == ("carol", "carol/chat-1", {"team": "search"})
    assert (anonymous["user"], anonymous["session"]) == (None, None)
    assert (slashed["session"], plain["session"]) == ("a%2Fb/c", "a/b/c")


# -- what is refused as malformed ----------------------------------------------------------


def test_oversize_input_is_400_and_metered_as_refused(keys):
    path, key = keys
    long_question = [{"role": "user", "content": "Tell me about paging. " * 50}]
    with serving(tg.Guard(answer, model=MODEL, max_input_tokens=50), keys=KeyFile(path), max_body_bytes=4000) as s:
        client = s.client(key["alice"])
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model=MODEL, messages=long_question)
        with pytest.raises(openai.BadRequestError) as too_long_prompt:
            client.completions.create(model=MODEL, prompt=long_question[0]["content"])
        assert client.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content == REPLY
        huge = httpx.post(f"{s.url}/v1/chat/completions", headers={"authorization": f"Bearer {key['alice']}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 10_000}]})
        metrics = s.metrics()
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "messages"
    assert "is over the limit of 50" in too_long.value.message
    # /v1/completions has no messages: the error names what the client sent.
    assert too_long_prompt.value.code == "context_length_exceeded" and too_long_prompt.value.param == "prompt"
    assert huge.status_code == 413 and "over this gateway's limit of 4000 bytes" in huge.json()["error"]["message"]
    assert [r["stop_reason"] for r in s.guard.ledger.records()] == ["input_too_long", "input_too_long", "stop"]
    assert metrics['tokenguard_refusals_total{reason="input_too_long"}'] == 2
    assert metrics['tokenguard_refusals_total{reason="body_too_large"}'] == 1


MALFORMED = [
    (b"{not json", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b'["a list"]', "must be a JSON object"),
    (b'{"model": "gpt-4o"}', "'messages' must be a non-empty list"),
    (b'{"model": "gpt-4o", "messages": []}', "'messages' must be a non-empty list"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "'model' is required"),
    (b'{"model": "gpt-4o", "messages": [{"content": "hi"}]}', "messages[0].role must be one of"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": 7}]}', "messages[0].content must be"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user"}]}', "has no content"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "text parts only"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     "without tool calls"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "'n' must be 1"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": true}', "'n' must be 1"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "'stream' must be"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}',
     "'temperature' must be >= 0 and <= 2"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
     "'max_tokens' must be an integer >= 1"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1}',
     "'frequency_penalty' is not supported by this gateway's backend"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}',
     "only allowed with 'stream': true"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "colour": "blue"}', "unknown field colour"),
    (b'{"model": "gpt-4o", "messages": [{"role": ["user"], "content": "hi"}]}', "messages[0].role must be one of"),
    # Forwarded, but not counted: a budget and an input cap would not see them.
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", '
     b'"cache_control": {"pad": "x"}}]}]}',
     "messages[0].content[0] has fields this gateway does not take: cache_control"),
    (b'{"model": "gpt-4o", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", '
     b'"type": "function", "function": {"name": "f", "arguments": "{}", "pad": "x"}}]}, '
     b'{"role": "user", "content": "hi"}]}',
     "messages[0].tool_calls[0].function has fields this gateway does not take"),
    (b'{"model": "gpt-4o", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": 1}]}, '
     b'{"role": "user", "content": "hi"}]}', "messages[0].tool_calls[0] must be"),
    # Half a UTF-16 pair is valid JSON but no text: neither SQLite nor an upstream request takes it.
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800 hi"}]}', "unpaired UTF-16 surrogate"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "user": "mallory\\udfff"}',
     "unpaired UTF-16 surrogate"),
    # JSON in UTF-16 or UTF-32 (which json.loads takes from bytes) would slip past the check above.
    ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "user": "mallory\\udfff"}'
     .encode("utf-16-le"), "not valid JSON"),  # as UTF-8: NULs between the characters
    ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'.encode("utf-32"), "not UTF-8 text"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}",
     "'temperature' must be >= 0 and <= 2"),
]


def test_a_function_backend_is_sent_only_the_parameters_it_takes():
    def plain(messages, max_tokens):
        return "plain answer"

    with serving(tg.Guard(plain, model=MODEL)) as served, httpx.Client(base_url=served.url) as http:
        request = {"model": MODEL, "messages": QUESTION}
        assert http.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"] == (
            "plain answer")
        refused = http.post("/v1/chat/completions", json={**request, "temperature": 0.7})
        bom = http.post("/v1/chat/completions", content=b"\xef\xbb\xbf" + json.dumps(request).encode(),
                        headers={"content-type": "application/json"})
    assert refused.status_code == 400, refused.text
    assert "'temperature' is not supported by this gateway's backend" in refused.json()["error"]["message"]
    assert bom.status_code == 200, bom.text  # a UTF-8 byte order mark is UTF-8


def test_a_piece_that_is_no_utf8_is_sent_as_a_json_escape():
    async def halves(messages, max_tokens):
        yield "\ud83d"  # half of an emoji's UTF-16 pair, as a backend may cut one
        yield " and more"

    with serving(tg.Guard(halves, model=MODEL)) as served:
        stream = served.client().chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
        pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
        whole = served.client().chat.completions.create(model=MODEL, messages=QUESTION)
    assert "".join(p for p in pieces if p) == "\ud83d and more"  # the stream ran to its end, not cut
    assert whole.choices[0].message.content == "\ud83d and more"


def test_malformed_requests_are_400_with_an_openai_error_and_nothing_else():
    with serving(tg.Guard(answer, model=MODEL)) as served, httpx.Client(base_url=served.url) as http:
        answers = [http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                   for body, _ in MALFORMED]
        session = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION},
                            headers={"x-session-id": "s" * 129})
        # Fields that ask for nothing are ignored, as clients send every field.
        quiet = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "tools": None,
                                                         "logprobs": False, "n": 1, "user": None})
        paired = http.post("/v1/chat/completions", headers={"content-type": "application/json"},
                           content=b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
        metrics = served.metrics()
    assert paired.status_code == 200, paired.text  # a whole pair escaped is an emoji
    for response, (_, expected) in zip(answers, MALFORMED, strict=True):
        assert response.status_code == 400, (expected, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert expected in error["message"], (expected, error["message"])
        assert "Traceback" not in response.text
    assert session.status_code == 400 and "x-session-id" in session.json()["error"]["message"]
    assert quiet.status_code == 200 and quiet.json()["choices"][0]["message"]["content"] == REPLY
    assert len(served.guard.ledger.records()) == 2  # only the well-formed requests reached the guard
    assert metrics['tokenguard_refusals_total{reason="invalid_request"}'] == len(MALFORMED) + 1


def test_an_upstream_failure_is_502_without_its_url_or_answer():
    with OpenAIServer() as upstream:
        port = str(upstream.server_address[1])
        guard = tg.Guard(OpenAICompatible(upstream.base_url, "fail", tokenizer="o200k_base"), prices=FREE)
        with serving(guard) as served, pytest.raises(openai.APIStatusError) as failed:
            served.client().chat.completions.create(model="fail", messages=QUESTION)
    error = failed.value
    assert error.status_code == 502 and error.body["message"] == "the model backend failed (it answered 500)"
    assert port not in error.response.text and "exploded" not in error.response.text
    [row] = served.guard.ledger.records()
    assert row["stop_reason"] == "error" and port in row["error"]  # the ledger keeps the details


def test_a_stream_that_breaks_upstream_ends_with_an_error_event():
    with OpenAIServer() as upstream:
        guard = tg.Guard(OpenAICompatible(upstream.base_url, "break", tokenizer="o200k_base"), prices=FREE)
        with serving(guard) as served:
            pieces = []
            with pytest.raises(openai.APIError) as broken:
                for chunk in served.client().chat.completions.create(model="break", messages=QUESTION, stream=True):
                    pieces.append(chunk.choices[0].delta.content)
    assert pieces == REPLY_WORDS[:2]
    assert broken.value.message.startswith("the model backend failed")
    [row] = served.guard.ledger.records()
    assert row["stop_reason"] == "error" and row["output_tokens"] == tg.count_tokens("".join(pieces), model="gpt-4o")


# -- in front of an OpenAI-compatible server -----------------------------------------------


def test_in_front_of_an_upstream_the_usage_is_what_it_reported():
    with OpenAIServer() as upstream:
        guard = tg.Guard(OpenAICompatible(upstream.base_url, "gpt-4o-mini"), max_output_tokens=100)
        with serving(guard) as served:
            client = served.client()
            completion = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, temperature=0.5,
                                                        max_tokens=50, user="dan")
            chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, stream=True,
                                                         stream_options={"include_usage": True}, user="dan"))
        sent = [r["body"] for r in upstream.requests]
    whole, streamed = served.guard.ledger.records()
    assert completion.choices[0].message.content == "".join(REPLY_WORDS)
    assert completion.usage.prompt_tokens == PROMPT_TOKENS == whole["input_tokens"]
    assert completion.usage.prompt_tokens_details.cached_tokens == 10 == whole["cached_input_tokens"]
    assert completion.usage.completion_tokens == len(REPLY_WORDS) == whole["output_tokens"]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 10 == streamed["cached_input_tokens"]
    # What the upstream was sent: the client's sampling, the lower of the two caps, always streamed.
    assert (sent[0]["temperature"], sent[0]["max_tokens"], sent[0]["stream"]) == (0.5, 50, True)
    assert sent[1]["max_tokens"] == 100 and "user" not in sent[0]


# -- concurrency and departures ------------------------------------------------------------


def test_concurrent_clients_are_served_at_once_and_metered_each():
    clients = 16
    started, everyone = 0, asyncio.Event()

    async def together(messages, max_tokens, **params):
        # Every generation waits until all of them have begun: a gateway that served one
        # client at a time would never get here for the second (the clients time out).
        nonlocal started
        started += 1
        if started == clients:
            everyone.set()
        await everyone.wait()
        for piece in PIECES:
            yield piece

    def ask(i: int) -> tuple[str, Any]:
        client = served.client(timeout=60)
        if i % 2:
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=QUESTION, user=f"user{i}", stream=True, stream_options={"include_usage": True}))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        completion = client.chat.completions.create(model=MODEL, messages=QUESTION, user=f"user{i}")
        return completion.choices[0].message.content, completion.usage

    with serving(tg.Guard(together, model=MODEL)) as served, ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, range(clients)))
    assert all(text == REPLY for text, _ in results)
    assert all((u.prompt_tokens, u.completion_tokens) == (exact(QUESTION), exact(REPLY)) for _, u in results)
    rows = served.guard.ledger.records()
    assert sorted(r["user"] for r in rows) == sorted(f"user{i}" for i in range(clients))
    assert all(r["stop_reason"] == "stop" and r["output_tokens"] == exact(REPLY) for r in rows)


def test_a_client_that_leaves_mid_stream_cancels_the_generation_and_is_metered(keys):
    path, key = keys
    endless = Endless()
    guard = tg.Guard(endless, model=MODEL, max_output_tokens=100_000, stop=None)  # " word word ..." is no loop here
    with serving(guard, keys=KeyFile(path)) as served:
        seen = []
        with served.client(key["alice"]).chat.completions.create(model=MODEL, messages=QUESTION, stream=True) as s:
            for chunk in s:
                seen.append(chunk.choices[0].delta.content)
                if len(seen) == 3:
                    break  # leaving the block closes the connection
        assert endless.closed.wait(20), "the backend's generation was not stopped"
        row = wait_until(lambda: served.guard.ledger.records(), "the cancelled call's row")[0]
        metrics = served.metrics(**{'tokenguard_http_requests_total{endpoint="/v1/chat/completions",status="200"}': 1})
    assert seen == [" word"] * 3
    assert row["user"] == "alice" and row["stop_reason"] == "cancelled"
    # Metered exactly: what the guard passed on (at least what the client saw, at most what was made).
    assert 3 <= row["output_tokens"] <= endless.pieces
    assert row["input_tokens"] == exact(QUESTION)
    assert metrics['tokenguard_calls_total{model="gpt-4o",stop_reason="cancelled"}'] == 1
    assert metrics['tokenguard_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 1


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it_too():
    endless = Endless()
    with serving(tg.Guard(endless, model=MODEL, max_output_tokens=100_000, stop=None)) as served:
        with pytest.raises(openai.APITimeoutError):
            served.client(timeout=0.5).chat.completions.create(model=MODEL, messages=QUESTION, user="erin")
        assert endless.closed.wait(20)
        [row] = wait_until(lambda: served.guard.ledger.records(), "the cancelled call's row")
        served.metrics(**{'tokenguard_http_requests_total{endpoint="/v1/chat/completions",status="499"}': 1})
    assert (row["user"], row["stop_reason"]) == ("erin", "cancelled") and row["output_tokens"] > 0


class SlowToOpen(Function):
    """A function backend whose opening (the guard calls ``warmup()`` while it prepares
    each call, in its worker thread) waits, once armed, until the test lets it go."""

    def __init__(self, fn: Any) -> None:
        super().__init__(fn)
        self.armed = False
        self.entered, self.release = threading.Event(), threading.Event()

    def warmup(self) -> None:
        if self.armed:
            self.entered.set()
            assert self.release.wait(30)


def test_a_client_that_leaves_while_its_call_opens_still_settles_its_budget():
    endless = Endless()
    backend = SlowToOpen(endless)
    budget = tg.Budget(tokens=10_000, per="user")
    guard = tg.Guard(backend, model=MODEL, max_output_tokens=1000, budget=budget, stop=None)
    body = json.dumps({"model": MODEL, "messages": QUESTION, "stream": True, "user": "fay"}).encode()
    with serving(guard) as served:
        backend.armed = True
        port = int(served.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as client:  # sends, then hangs up unanswered
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert backend.entered.wait(20)  # the call is being opened in the guard's worker thread
        time.sleep(0.2)  # the client has gone: let the gateway see it before the opening ends
        backend.release.set()
        # A call dropped while it opened would leave no row and its hold on the budget for ever.
        [row] = wait_until(lambda: served.guard.ledger.records(), "the row of the call cancelled as it opened")
        # Ended before its backend started, or stopped once it had.
        assert endless.pieces == 0 or endless.closed.wait(20), "the generation was not stopped"
    assert (row["user"], row["stop_reason"]) == ("fay", "cancelled")
    # The hold on the budget was settled to what was used, not left behind.
    spent = budget.spent(user="fay")
    assert spent["reserved_tokens"] == 0 and spent["tokens"] == row["input_tokens"] + row["output_tokens"]


def test_leaving_mid_stream_hangs_up_on_the_upstream():
    with OpenAIServer() as upstream:
        guard = tg.Guard(OpenAICompatible(upstream.base_url, "endless", tokenizer="o200k_base"),
                         max_output_tokens=1_000_000, stop=None, prices=FREE)
        with serving(guard) as served:
            with served.client().chat.completions.create(model="endless", messages=QUESTION, stream=True) as stream:
                for i, _ in enumerate(stream):
                    if i == 2:
                        break
            wait_until(lambda: upstream.hangups, "the gateway to hang up on the upstream")
            [row] = wait_until(lambda: served.guard.ledger.records(), "the cancelled call's row")
    assert row["stop_reason"] == "cancelled" and row["output_tokens"] >= 3


# -- the cache and the metrics -------------------------------------------------------------


def test_the_exact_cache_answers_again_per_user_at_no_cost(keys, tmp_path):
    path, key = keys
    cache = ExactCache(tmp_path / "cache")
    with cache, serving(tg.Guard(answer, model=MODEL, cache=cache), keys=KeyFile(path)) as served:
        alice, bob = served.client(key["alice"]), served.client(key["bob"])
        first = alice.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
        again = alice.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
        again_streamed = list(alice.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}))
        other = bob.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
        metrics = served.metrics()
    assert again.choices[0].message.content == REPLY and again.tokenguard["cached"] is True
    assert (again.usage.prompt_tokens, again.usage.completion_tokens) == (0, 0)  # billed nothing
    assert again.tokenguard["saved_tokens"] == first.usage.total_tokens
    assert "".join(c.choices[0].delta.content or "" for c in again_streamed if c.choices) == REPLY
    assert again_streamed[-1].usage.total_tokens == 0
    assert other.tokenguard["cached"] is False  # bob never reads alice's answers
    assert [r["cached"] for r in served.guard.ledger.records()] == [0, 1, 1, 0]
    assert metrics['tokenguard_cache_hits_total{model="gpt-4o"}'] == 2
    assert metrics['tokenguard_saved_tokens_total{model="gpt-4o",mechanism="cache"}'] == 2 * first.usage.total_tokens


def test_a_cached_answer_that_was_cut_says_so_again(tmp_path):
    # A client that continues on "length" must not take a hit of a cut answer for a whole one.
    with ExactCache(tmp_path / "cache") as cache, serving(tg.Guard(answer, model=MODEL, cache=cache)) as served:
        client = served.client()
        ask = functools.partial(client.chat.completions.create, model=MODEL, messages=QUESTION, temperature=0,
                                max_tokens=3)
        cut, again = ask(), ask()
        streamed = list(ask(stream=True))
        whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
        whole_again = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert cut.choices[0].finish_reason == "length" and again.tokenguard["cached"] is True
    assert again.choices[0].finish_reason == "length"
    assert again.choices[0].message.content == cut.choices[0].message.content
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    assert whole_again.tokenguard["cached"] is True and whole_again.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content == REPLY


def test_metrics_add_up_to_the_ledger():
    guard = tg.Guard(answer, model=MODEL, max_output_tokens=8, budget=tg.Budget(tokens=60, per="user"))
    with serving(guard) as served:
        client = served.client()
        for user in ("ann", "ann", "ann", "ben"):
            with contextlib.suppress(openai.RateLimitError):
                client.chat.completions.create(model=MODEL, messages=QUESTION, user=user)
        list(client.chat.completions.create(model=MODEL, messages=QUESTION, user="ben", stream=True))
        counted = 'tokenguard_http_request_duration_seconds_count{endpoint="/v1/chat/completions"}'
        metrics = served.metrics(**{counted: 5})
    rows = served.guard.ledger.records()
    by_reason = Counter(r["stop_reason"] for r in rows)
    assert by_reason["budget_exceeded"] >= 1 and by_reason["length"] >= 2
    for reason, calls in by_reason.items():
        assert metrics[f'tokenguard_calls_total{{model="gpt-4o",stop_reason="{reason}"}}'] == calls
    for column, series in (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens")):
        assert metrics[f'tokenguard_{series}_total{{model="gpt-4o"}}'] == sum(r[column] for r in rows)
    assert metrics['tokenguard_cost_usd_total{model="gpt-4o"}'] == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert len(rows) == 5
    answered = len(rows) - by_reason["budget_exceeded"]
    assert metrics['tokenguard_call_duration_seconds_count{model="gpt-4o"}'] == answered
    assert metrics['tokenguard_time_to_first_token_seconds_count{model="gpt-4o"}'] == 1
    assert metrics["tokenguard_http_requests_in_flight"] == 1  # this scrape
    assert 'tokenguard_http_request_duration_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"}' in metrics


# -- keys and the command line -------------------------------------------------------------


def test_the_key_file_holds_hashes_and_reloads_when_it_changes(tmp_path, caplog):
    path = tmp_path / "keys.jsonl"
    alice = add_key(path, "alice")
    bob = add_key(path, "bob")
    text = path.read_text()
    assert alice.startswith("tg-") and alice not in text and bob not in text and hash_key(alice) in text
    assert path.stat().st_mode & 0o777 == 0o600
    keys = KeyFile(path, recheck_s=0)
    assert (keys.user_of(alice), keys.user_of(bob), keys.user_of("tg-guess"), keys.users) == (
        "alice", "bob", None, {"alice", "bob"})
    # Revoking bob's key: delete its line.
    path.write_text("".join(line + "\n" for line in text.splitlines() if '"bob"' not in line))
    assert keys.user_of(bob) is None and keys.user_of(alice) == "alice"
    # A broken edit keeps the last good keys rather than locking everyone out.
    path.write_text(path.read_text() + "{half a line\n")
    assert keys.user_of(alice) == "alice"
    assert "cannot be read, keeping the last good keys" in caplog.text


@pytest.mark.parametrize(("content", "message"), [
    ("not json\n", "line 1 is not JSON"),
    ('# a comment\n\n{"user": "ann"}\n', "line 3: \"sha256\" must be 64 lowercase hex digits"),
    ('{"user": "", "sha256": "' + "a" * 64 + '"}\n', "a user name is 1 to 128 printable characters"),
    ('{"user": "a", "sha256": "' + "a" * 64 + '"}\n{"user": "b", "sha256": "' + "a" * 64 + '"}\n',
     "line 2 repeats a key hash already given to 'a'"),
])
def test_a_malformed_key_file_is_refused_naming_the_line(tmp_path, content, message):
    path = tmp_path / "keys.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        KeyFile(path)
    with pytest.raises(ConfigError):  # nor is a key added to it
        add_key(path, "carol")


def tokenguard(*args: str) -> subprocess.Popen[str]:
    """`python -m tokenguard ARGS`, running."""
    return subprocess.Popen([sys.executable, "-m", "tokenguard", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def first_line(stream: Any, timeout: float = 120.0) -> str:
    """The first line of a pipe, or a failure if none comes (a bound against hanging)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, "the process printed no line"
    return lines[0]


def test_tokenguard_serve_in_a_subprocess_issues_keys_serves_and_stops_on_sigint(tmp_path):
    keys, ledger = tmp_path / "keys.jsonl", tmp_path / "usage.sqlite"
    added = tokenguard("serve", "--keys", str(keys), "--add-key", "alice")
    out, err = added.communicate(timeout=120)
    assert added.returncode == 0, err
    key = out.strip()
    assert key.startswith("tg-") and "added a key for alice" in err
    with OpenAIServer() as upstream:
        server = tokenguard("serve", "--upstream", upstream.base_url, "--model", "gpt-4o-mini", "--port", "0",
                            "--keys", str(keys), "--ledger", str(ledger), "--max-output-tokens", "64")
        try:
            announced = first_line(server.stderr)
            match = re.search(r"on (http://127\.0\.0\.1:\d+/v1) \(1 users in ", announced)
            assert match, announced
            client = openai.OpenAI(base_url=match.group(1), api_key=key, max_retries=0)
            completion = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
            assert completion.usage.prompt_tokens == PROMPT_TOKENS
            good = keys.read_text(encoding="utf-8")
            keys.write_text(good + "{not json\n", encoding="utf-8")  # an edit gone wrong
            time.sleep(1.1)  # the file is looked at again once a second
            again = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
        finally:
            server.send_signal(signal.SIGINT)
            _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "Traceback" not in err
    # The server says so in its log (tokenguard's own loggers print beside uvicorn's), and keeps the last good keys.
    assert f"key file {keys} changed but cannot be read, keeping the last good keys" in err
    assert again.usage.prompt_tokens == PROMPT_TOKENS
    with tg.Ledger(ledger) as written:
        row = written.records()[0]
    assert (row["user"], row["input_tokens"], row["request_id"]) == ("alice", PROMPT_TOKENS, completion.id[9:])


def test_serve_mistakes_are_one_line_errors(tmp_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    cases = [
        (["--upstream", "http://127.0.0.1:9/v1"], "--upstream needs --model"),
        (["--add-key", "bob"], "--add-key needs --keys FILE"),
        (["--model", "/no/such/model.gguf"], "no model at /no/such/model.gguf"),
        (["--upstream", "http://127.0.0.1:9/v1", "--model", "gpt-4o-mini", "--port", port], "cannot listen on"),
        (["--upstream", "http://127.0.0.1:9/v1", "--model", "gpt-4o-mini", "--port", "0", "--keys",
          str(tmp_path / "none.jsonl")], "no key file at"),
        (["--upstream", "http://127.0.0.1:9/v1", "--model", "llama-local", "--port", "0"],
         "does not know the tokenizer of model 'llama-local'"),
        (["--port", "70000"], "expected a port from 0 to 65535"),
        (["--budget-per", "team"], "invalid choice: 'team'"),
    ]
    with busy:
        for args, message in cases:
            assert main(["serve", *args]) == 2, args
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, (args, err)


def test_import_tokenguard_loads_no_web_stack():
    code = "import sys, tokenguard; print(sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(tg.__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- the bundled model ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_bundled_runner_serves_concurrent_clients_and_frees_its_kv_blocks(bundled_runner):
    guard = tg.Guard(bundled_runner, max_output_tokens=400, stop=None)
    model = guard.model
    questions = [[{"role": "user", "content": f"Name a colour. ({i})"}] for i in range(4)]
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]

    def ask(messages: list[dict[str, str]]) -> tuple[str, Any, str]:
        chunks = list(served.client(timeout=300).chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, max_tokens=12,
            user="kim"))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage, chunks[0].id

    with serving(guard) as served, ThreadPoolExecutor(4) as pool:
        # The runner is the test session's: other tests' chat sessions may still hold blocks.
        free_before = served.metrics()["tokenguard_kv_blocks_free"]
        results = list(pool.map(ask, questions))
        with served.client().chat.completions.create(model=model, messages=story, stream=True) as stream:
            next(iter(stream))  # then leave, long before 400 tokens
        wait_until(lambda: len(served.guard.ledger.records()) == 5, "the cancelled call's row")
        metrics = wait_until(lambda: (m := served.metrics())["tokenguard_kv_blocks_free"] == free_before and m,
                             "every KV block the calls took to be free again")
    rows = {row["request_id"]: row for row in served.guard.ledger.records()}
    for (text, usage, answer_id), messages in zip(results, questions, strict=True):
        row = rows[answer_id.removeprefix("chatcmpl-")]
        assert usage.prompt_tokens == tg.count_tokens(messages, model=model) == row["input_tokens"]
        assert 0 < usage.completion_tokens <= 12 and text
        assert row["output_tokens"] == usage.completion_tokens
    assert Counter(r["stop_reason"] for r in rows.values())["cancelled"] == 1
    assert metrics["tokenguard_kv_blocks_total"] > 0 and metrics["tokenguard_engine_running"] == 0


def test_an_upstream_s_refusal_and_busy_answers_reach_the_client_as_such():
    from tokenguard.backends.openai_compatible import _error
    from tokenguard.errors import BackendError
    from tokenguard.serve.errors import api_error

    body = b'{"message": "maximum context length is 8192"}'
    refused = api_error(_error(400, {}, body, "http://llm.internal/v1/chat/completions"))
    assert refused.status == 400 and "maximum context length is 8192" in refused.body()["error"]["message"]
    assert "llm.internal" not in json.dumps(refused.body())  # its words, not its address
    busy = api_error(BackendError("POST http://llm.internal/v1/chat/completions answered 429: slow down", 429))
    assert busy.status == 429 and busy.headers.get("retry-after") == "1"
    assert api_error(BackendError("POST http://x/v1/chat/completions answered 500: boom", 500)).status == 502
    # A 404 or 405 means the gateway's --upstream or --model is wrong: the gateway's fault, not the client's.
    for status in (401, 403, 404, 405, 407):
        assert api_error(BackendError(f"POST http://x/v1/chat/completions answered {status}: no", status)).status == 502


def test_an_upstream_s_finish_reason_and_a_usd_budget_are_said_as_they_are():
    from tokenguard.accounting import Reply, Usage
    from tokenguard.errors import BudgetExceeded
    from tokenguard.serve.errors import api_error
    from tokenguard.serve.shapes import finish_reason

    for reason, said in (("content_filter", "content_filter"), ("tool_calls", "tool_calls"), ("length", "length"),
                         ("repetition", "stop"), ("stop", "stop")):
        assert finish_reason(Reply("x", reason, [], Usage(), "r", "m")) == said
    spending = tg.Budget(usd=0.0001, per="user")
    refusal = api_error(BudgetExceeded(spending, "user:ann", "usd", 0.005, 0.0001))
    assert refusal.status == 429 and "your spending budget is spent" in refusal.body()["error"]["message"]


def test_fields_sent_with_their_defaults_ask_for_nothing_and_pass():
    # Clients that fill every field with its default (penalties of 0, an empty logit_bias)
    # could not use the bundled gateway: each default was refused as a request.
    from tokenguard.serve.errors import ApiError
    from tokenguard.serve.parse import BUNDLED_PARAMS, parse_chat

    hi = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for neutral in ({"logit_bias": {}}, {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"tool_choice": "none"},
                    {"response_format": {"type": "text"}}, {"top_logprobs": 0}, {"user": ""}):
        parse_chat({**hi, **neutral}, model="m", allowed=BUNDLED_PARAMS)
    for asking in ({"presence_penalty": 0.5}, {"tool_choice": "auto"}, {"logit_bias": {"50256": -100}},
                   {"max_tokens": 0}, {"max_completion_tokens": 0}):
        with pytest.raises(ApiError):
            parse_chat({**hi, **asking}, model="m", allowed=BUNDLED_PARAMS)
