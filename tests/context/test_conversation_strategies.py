"""What every strategy that keeps state per conversation (Summary, Retrieval) promises
about sessions: a session that ends or expires frees what the strategy keeps for it."""

from __future__ import annotations

import pytest

from tokenguard import Guard
from tokenguard.context import ConversationStrategy, Retrieval, SessionHistory, Summary, TailOnly
from tokenguard.context.summary import INSTRUCTION


class Clock:
    """Time for the test to move."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


def _backend(messages, max_tokens):
    return "The user listed gym codes." if messages[0]["content"] == INSTRUCTION else "noted"


STRATEGIES = {"summary": lambda: Summary(keep_recent_tokens=40), "retrieval": lambda: Retrieval(k=2)}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_session_s_state_is_freed_when_it_ends_or_expires(name):
    if name == "retrieval":
        pytest.importorskip("faiss")
    strategy = STRATEGIES[name]()
    assert isinstance(strategy, ConversationStrategy)
    clock = Clock()
    guard = Guard(_backend, model="gpt-4o", context=strategy, max_context_tokens=150,
                  history=SessionHistory(ttl_s=10, clock=clock))
    for session in ("a", "b"):
        for i in range(15):
            guard.chat(f"Note {i}: the code for gym {i} is {1000 + 7 * i}.", session=session)
    assert len(strategy._states) == 2
    guard.end_session("a")
    assert len(strategy._states) == 1
    clock.now = 11
    assert not guard.touch("b")  # expired: its history and the strategy's state are freed
    assert len(strategy._states) == 0


@pytest.mark.parametrize("name", ["tail-only", *STRATEGIES])
def test_a_developer_message_is_kept_like_a_system_message(name):
    # OpenAI's newer models (o1, gpt-4.1) take their instructions as role "developer".
    if name == "retrieval":
        pytest.importorskip("faiss")
    strategy = TailOnly() if name == "tail-only" else STRATEGIES[name]()
    guard = Guard(_backend, model="gpt-4.1", context=strategy, max_context_tokens=200)
    instruction = {"role": "developer", "content": "Answer in French."}
    history = [instruction]
    for i in range(100):
        history += [{"role": "user", "content": f"Question {i} about the weather?"},
                    {"role": "assistant", "content": f"Answer {i}: it is sunny."}]
    reply = guard.complete([*history, {"role": "user", "content": "And tomorrow?"}])
    assert reply.messages[0] == instruction and reply.usage.input_tokens <= 200
    assert len(reply.messages) < len(history)  # the old turns were left out, the instruction not
