"""The Backend protocol: what a backend may offer, with defaults a subclass inherits,
and how the guard uses what it declares."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tokenguard import ConfigError, Guard
from tokenguard.backends import Backend, BundledRunner, Chunk, Function, OpenAICompatible, Transformers


class Echo(Backend):
    """A user's own backend: two streams, everything else inherited."""

    name = "echo"
    model = "gpt-4o"

    def __init__(self) -> None:
        self.params: list[dict] = []

    def stream(self, messages, params) -> Iterator[Chunk]:
        self.params.append(params)
        yield Chunk(text=messages[-1]["content"], finish_reason="stop")

    async def astream(self, messages, params) -> AsyncIterator[Chunk]:
        for chunk in self.stream(messages, params):
            yield chunk


class SessionEcho(Echo):
    accepts_session = True


def test_a_subclass_inherits_the_declared_defaults():
    backend = Echo()
    assert isinstance(backend, Backend)
    assert backend.accepts_session is False and backend.is_async is False and backend.tokenizer() is None


def test_the_session_goes_to_backends_that_accept_it_only():
    plain, keeping = Echo(), SessionEcho()
    Guard(plain).complete("hi", session="s1")
    Guard(keeping).complete("hi", session="s1")
    assert "session" not in plain.params[0]
    assert keeping.params[0]["session"] == "s1"


def test_every_bundled_backend_is_a_backend():
    for backend in (
        Function(lambda messages: "x"),
        BundledRunner(),  # loads nothing until first used
        OpenAICompatible("http://127.0.0.1:9/v1", "gpt-4o"),
        Transformers("/nonexistent/model/folder"),
    ):
        assert isinstance(backend, Backend), backend
        assert isinstance(backend.accepts_session, bool) and isinstance(backend.is_async, bool)
    assert BundledRunner().accepts_session


def test_an_object_that_is_not_a_backend_is_refused():
    class HalfBackend:
        name = "half"
        model = None

        def stream(self, messages, params):
            yield Chunk(text="x")

    with pytest.raises(ConfigError, match="backend must be"):
        Guard(HalfBackend())
