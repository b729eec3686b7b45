"""Retrieval, with the real embedding model (all-MiniLM-L6-v2) and real FAISS: the
guarantees over random histories, recall of an older turn by meaning and by words,
each turn embedded once, bounded indexes, documents, and sessions that free theirs."""

from __future__ import annotations

import copy

import pytest
from guarantees import TOKENIZERS, check_guarantees, histories
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenguard import ConfigError, Guard, InputTooLong
from tokenguard.context import Retrieval, TailOnly
from tokenguard.context.embedder import as_embedder
from tokenguard.context.retrieval import DOCUMENTS_HEADER, RECALLED_HEADER, terms

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

GPT = TOKENIZERS["gpt-4o"]
SMOL = TOKENIZERS["SmolLM2-135M-Instruct"]
MINILM = as_embedder(None)

TOPICS = ["the weather in town", "a football match", "baking bread", "a code review", "train delays",
          "the garden", "a new laptop", "a museum visit"]


def _chat(facts: dict[int, str], turns: int = 60) -> list[dict]:
    """A system message and ``turns`` user/assistant pairs of small talk; turn ``i`` in
    ``facts`` says that fact instead."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        said = facts.get(i, f"Let's talk about {TOPICS[i % len(TOPICS)]} for a moment, item {i}.")
        messages += [{"role": "user", "content": said}, {"role": "assistant", "content": f"Sure, noted ({i})."}]
    return messages


class Counting:
    """The real embedder, counting the texts it is given."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts):
        self.texts += texts
        return MINILM(texts)


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), budget=st.integers(5, 400), keep=st.integers(0, 200))
def test_every_guarantee_holds(name, data, budget, keep):
    tokenizer = TOKENIZERS[name]
    history = data.draw(histories(call_content=None if name == "gpt-4o" else ""))
    before = copy.deepcopy(history)
    try:
        fitted = Retrieval(k=4, keep_recent_tokens=keep).fit(history, budget, tokenizer)
    except InputTooLong:
        systems = [m for m in history if m["role"] == "system"]
        assert tokenizer.count_messages([*systems, history[-1]]) > budget
    else:
        check_guarantees(history, fitted, budget, tokenizer, added=(RECALLED_HEADER, DOCUMENTS_HEADER))
    assert history == before


@pytest.mark.parametrize("tokenizer", [GPT, SMOL], ids=["gpt-4o", "smollm2"])
def test_an_old_fact_is_recalled_by_meaning_and_tail_only_loses_it(tokenizer):
    history = _chat({5: "My sister's dog is called Biscuit and he hates the vacuum cleaner."})
    history.append({"role": "user", "content": "What is the name of my sister's puppy?"})
    fitted = Retrieval(k=2).fit(history, 300, tokenizer)
    assert tokenizer.count_messages(fitted) <= 300
    recalled = fitted[1]
    assert recalled["role"] == "system" and recalled["content"].startswith(RECALLED_HEADER)
    assert "user: My sister's dog is called Biscuit" in recalled["content"]
    assert "assistant: Sure, noted (5)." in recalled["content"]  # its neighbour: the answer to it
    assert fitted[-1] == history[-1] and fitted[0] == history[0]
    assert "Biscuit" not in str(TailOnly().fit(history, 300, tokenizer))


def test_a_code_is_recalled_by_its_words():
    facts = {i: f"Parcel {i}: the tracking code is ZX{i:04d}QK, it ships from Leeds." for i in range(0, 50, 5)}
    history = [*_chat(facts), {"role": "user", "content": "Where is ZX0035QK shipping from?"}]
    fitted = Retrieval(k=1, neighbours=0).fit(history, 200, GPT)
    assert "ZX0035QK, it ships from Leeds" in fitted[1]["content"]
    assert fitted[1]["content"].count("tracking code") == 1


def test_chinese_text_is_matched_by_character_pairs():
    assert terms("我的护照号码是多少") == ["我的", "的护", "护照", "照号", "号码", "码是", "是多", "多少"]
    history = _chat({7: "我的护照号码是 E12345678，下个月到期。"})
    history.append({"role": "user", "content": "我的护照号码是多少？"})
    fitted = Retrieval(k=2).fit(history, 250, SMOL)
    assert "E12345678" in fitted[1]["content"] and SMOL.count_messages(fitted) <= 250


def test_each_turn_is_embedded_once_across_a_growing_chat():
    embedder = Counting()
    strategy = Retrieval(embedder, k=3)
    history = _chat({3: "The wifi password at the cabin is blue-heron-42."}, turns=40)
    for end in range(41, len(history) + 1, 4):
        strategy.fit([*history[:end], {"role": "user", "content": "What's the cabin wifi password?"}], 250, GPT)
    turns = [text for text in embedder.texts if text.startswith(("user:", "assistant:"))]
    assert len(turns) == len(set(turns))  # no turn twice
    questions = [text for text in embedder.texts if not text.startswith(("user:", "assistant:"))]
    assert len(questions) == len(range(41, len(history) + 1, 4))  # and one question per fit


def test_a_conversation_that_fits_is_sent_as_it_is_and_nothing_is_embedded():
    embedder = Counting()
    history = [*_chat({}, turns=3), {"role": "user", "content": "And?"}]
    assert Retrieval(embedder).fit(history, 2_000, GPT) == history
    assert embedder.texts == []


def test_indexes_are_bounded_per_session_and_in_sessions():
    strategy = Retrieval(k=2, max_turns=10, max_sessions=2)
    history = [*_chat({}, turns=40), {"role": "user", "content": "What about the garden?"}]
    for session in ("a", "b", "c"):
        strategy.fit(history, 200, GPT, session=session)
    assert len(strategy._states) == 2  # the least recently used session went
    memory = strategy._states.get("session:c", lambda: None)
    assert len(memory.items) == 10 and memory._index.ntotal == 10  # the oldest turns went
    fitted = strategy.fit(history, 200, GPT, session="c")  # still fits and recalls after eviction
    assert GPT.count_messages(fitted) <= 200


def test_documents_are_chunked_by_tokens_and_recalled():
    manual = ("The espresso machine must be descaled every 200 shots. " * 3
              + "To descale it, run the blue program with citric acid. " + "Warranty claims go to the shop. " * 6)
    strategy = Retrieval(documents=[manual, "Unrelated text about bicycles. " * 20], chunk_tokens=32, k=2)
    history = [*_chat({}, turns=30), {"role": "user", "content": "How do I descale the espresso machine?"}]
    fitted = strategy.fit(history, 300, GPT)
    text = fitted[1]["content"]
    assert DOCUMENTS_HEADER in text and "run the blue program with citric acid" in text
    chunks = strategy._document_chunks(GPT).items.values()
    assert len(chunks) > 4 and all(GPT.count(item.text.split("] ", 1)[1]) <= 32 for item in chunks)


def test_a_conversation_that_fits_is_sent_whole_with_the_documents_that_fit():
    # Through a guard too: the documents came only once the history overflowed the
    # window (with a 128k model, never), and a conversation that fit lost its turns.
    documents = ["The office wifi password is hunter2. The printer is on floor 3.",
                 "Lunch is served at noon in the cafeteria."]
    conversation = [*_chat({}, turns=12), {"role": "user", "content": "What is the wifi password?"}]
    strategy = Retrieval(documents=documents, keep_recent_tokens=40)
    fitted = strategy.fit(conversation, 2000, GPT)
    assert [m for m in fitted if DOCUMENTS_HEADER not in str(m["content"])] == conversation
    sent = []
    guard = Guard(lambda messages, max_tokens: sent.append(messages) or "ok", model="gpt-4o",
                  max_context_tokens=2000, context=strategy)
    guard.complete(conversation)
    assert len(sent[0]) == len(conversation) + 1 and "hunter2" in sent[0][1]["content"]


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ConfigError, match="k must be"):
        Retrieval(k=0)
    with pytest.raises(ConfigError, match="documents"):
        Retrieval(documents="one string")  # type: ignore[arg-type]


def test_a_guard_chat_recalls_an_old_fact():
    guard = Guard(lambda messages, max_tokens: "noted", model="gpt-4o", context=Retrieval(k=2), max_context_tokens=150)
    guard.chat("My locker code at the gym is 4417.", session="a")
    for i in range(20):
        guard.chat(f"Let's talk about {TOPICS[i % len(TOPICS)]}, item {i}.", session="a")
    reply = guard.chat("What is my gym locker code?", session="a")
    assert reply.usage.input_tokens <= 150 and "4417" in reply.messages[0]["content"]


@pytest.mark.slow
def test_a_chat_on_the_bundled_model_recalls_an_old_fact(bundled_runner):
    from tokenguard.backends import BundledRunner

    guard = Guard(BundledRunner(bundled_runner), context=Retrieval(k=4), max_context_tokens=200, max_output_tokens=8)
    guard.chat("My locker code at the gym is 4417.", session="r", temperature=0.0)
    for i in range(12):
        guard.chat(f"Say one word about {TOPICS[i % len(TOPICS)]}.", session="r", temperature=0.0)
    reply = guard.chat("What is my gym locker code?", session="r", temperature=0.0)
    assert reply.usage.input_tokens == guard.tokenizer.count_messages(reply.messages) <= 200
    recalled = [m["content"] for m in reply.messages if m["role"] == "system"]
    assert any(text.startswith(RECALLED_HEADER) and "4417" in text for text in recalled)
    assert len(guard.history.get("r")) == 28  # the history keeps everything; the prompt recalls
    guard.end_session("r")  # the runner is shared by the test session: give its KV blocks back


def test_an_embedder_of_the_wrong_shape_is_a_config_error():
    import numpy as np

    history = [{"role": "user", "content": f"question {i} " + "pad " * 40} for i in range(30)]
    for embedder in (lambda texts: [[1.0, 0.0, 0.0]], lambda texts: np.ones((len(texts), 3 + len(texts)))):
        guard = Guard(lambda messages, max_tokens: "ok", model="gpt-4o", max_context_tokens=300,
                      context=Retrieval(embedder))
        with pytest.raises(ConfigError, match="one vector per text"):
            guard.complete(history)
