"""Hostile input through the entry points beyond counting: the guard's streams, chat and
async twins, the decorator, every context strategy and both caches. Only
``TokenGuardError`` subclasses come out, with a message; whatever is answered is within
the limits the caller set."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_tokens import hostile_texts, message_lists

import tokenguard as tg
from tokenguard.cache import ExactCache, SemanticCache
from tokenguard.context import Relevant, Retrieval, Summary, TailOnly

SETTINGS = settings(deadline=None, max_examples=40,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GPT = tg.get_tokenizer("gpt-4o")
LIMIT = 2_000


def _answer(messages, max_tokens, **params):
    return "ok"


def _hashed(texts):
    """A cheap embedder for the semantic cache: what is tested is its handling of
    hostile text, not the quality of its neighbours."""
    import numpy as np

    vectors = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in str(text).split():
            vectors[row, hash(word) % 64] += 1.0
        vectors[row, 0] += 1.0
    return vectors


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> tg.Guard:
    pytest.importorskip("faiss")
    folder = tmp_path_factory.mktemp("hostile")
    caches = [ExactCache(folder / "exact"), SemanticCache(folder / "semantic", embedder=_hashed)]
    return tg.Guard(_answer, model="gpt-4o", max_input_tokens=LIMIT, max_context_tokens=4_000, cache=caches)


def _only_tokenguard_errors(run) -> Any:
    try:
        return run()
    except tg.TokenGuardError as error:
        assert str(error)
        return None


@SETTINGS
@given(text=hostile_texts)
def test_streams_chat_and_async_twins_answer_or_refuse(guard: tg.Guard, text: str) -> None:
    def stream() -> str:
        with guard.stream(text, temperature=0.0) as pieces:
            return "".join(pieces)

    for run in (
        stream,
        lambda: guard.chat(text, session="hostile", temperature=0.0).text,
        lambda: asyncio.run(guard.acomplete(text, temperature=0.0)).text,
        lambda: asyncio.run(guard.achat(text, session="hostile-async", temperature=0.0)).text,
    ):
        answer = _only_tokenguard_errors(run)
        assert answer in (None, "ok")


@SETTINGS
@given(payload=message_lists)
def test_malformed_messages_through_every_call_are_refused_clearly(guard: tg.Guard, payload: Any) -> None:
    for run in (
        lambda: guard.complete(payload, temperature=0.0),
        lambda: "".join(guard.stream(payload, temperature=0.0)),
        lambda: asyncio.run(guard.acomplete(payload, temperature=0.0)),
        lambda: guard.chat(payload, session="malformed", temperature=0.0),
    ):
        _only_tokenguard_errors(run)


@SETTINGS
@given(text=hostile_texts)
def test_the_decorator_answers_or_refuses(text: str) -> None:
    @tg.guard(model="gpt-4o", max_input_tokens=LIMIT)
    def ask(messages, max_tokens):
        return "ok"

    answer = _only_tokenguard_errors(lambda: ask(text))
    assert answer is None or tg.reply_of(answer).text == "ok" or answer == "ok"


STRATEGIES = {
    "tail-only": TailOnly,
    "relevant": Relevant,
    "summary": lambda: Summary(lambda text: text[-500:], keep_recent_tokens=50, max_summary_tokens=40),
    "retrieval": lambda: Retrieval(_hashed, k=3, keep_recent_tokens=50),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@SETTINGS
@given(payload=message_lists, budget=st.integers(0, 600))
def test_strategies_fit_or_refuse_hostile_histories(name: str, payload: Any, budget: int) -> None:
    if name == "retrieval":
        pytest.importorskip("faiss")
    fitted = _only_tokenguard_errors(lambda: STRATEGIES[name]().fit(payload, budget, GPT))
    if fitted is not None:
        assert GPT.count_messages(fitted) <= budget


def test_a_lone_surrogate_is_embedded_not_refused():
    pytest.importorskip("sentence_transformers")
    from tokenguard.context.embedder import as_embedder

    text = "the cabin wifi password is blue heron"
    vectors = as_embedder(None)([text.replace(" is", "\ud800 is"), text])
    assert vectors.shape[0] == 2 and float(vectors[0] @ vectors[1]) > 0.8
