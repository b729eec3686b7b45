"""SemanticCache through the Guard: the real all-MiniLM-L6-v2 and FAISS, real SQLite;
the labelled set of paraphrases and near misses; a cheap word-hashing embedder (a
public option: any callable from texts to vectors) where the model's meaning is not
what a test is about.

The scenarios that do not depend on where entries live take a ``location`` (a
directory, ``None`` or a Redis URL); ``test_semantic_redis.py`` runs them on Redis."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from one_function import answers_here, script_prelude

import tokenguard as tg
from tokenguard import Guard
from tokenguard.cache import SemanticCache, same_details
from tokenguard.cache import semantic as semantic_module
from tokenguard.cache.semantic_store import SQLiteSemanticEntries

pytest.importorskip("faiss")
PAIRS = Path(__file__).parent.parent / "data" / "cache" / "pairs.jsonl"
GREEDY = {"temperature": 0}


def hashed_words(texts):
    """Bag of words hashed into 64 dimensions: equal word sets give equal vectors."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1
    return out


class Answers:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages, *, max_tokens, **params):
        self.calls += 1
        return f"answer {self.calls}"


def load_minilm():
    """The bundled embedder, loaded (once per process: every caller shares it)."""
    pytest.importorskip("sentence_transformers")
    from tokenguard.context.embedder import as_embedder

    embed = as_embedder(None)
    embed(["warm up"])
    return embed


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def rewordings_hit_and_near_misses_miss(location, embedder) -> None:
    fn = Answers()
    with SemanticCache(location, embedder=embedder) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        stored = guard.complete("What is the capital of France?", **GREEDY)
        hit = guard.complete("Could you please tell me: what's the capital of france??", **GREEDY)
        assert hit.cached and hit.text == stored.text and hit.stop_reason == "cache"
        assert hit.usage.saved_tokens == stored.usage.total_tokens and hit.usage.input_tokens == 0
        for near_miss in ["What is the capital of Germany?", "What is the population of France?"]:
            assert not guard.complete(near_miss, **GREEDY).cached
        guard.complete("Convert 5 km to miles.", **GREEDY)
        for near_miss in ["Convert 50 km to miles.", "Convert 5 miles to km.", "Convert five km to meters."]:
            assert not guard.complete(near_miss, **GREEDY).cached
        assert guard.complete("convert 5 KM to miles", **GREEDY).cached
        guard.complete("北京的人口是多少？", **GREEDY)
        assert guard.complete("请问北京的人口是多少", **GREEDY).cached
        assert not guard.complete("上海的人口是多少？", **GREEDY).cached


@pytest.mark.slow
def test_rewordings_hit_and_near_misses_miss(minilm):
    rewordings_hit_and_near_misses_miss(None, minilm)


@pytest.mark.slow
def test_the_conversation_and_the_request_must_match(minilm):
    fn = Answers()
    with SemanticCache(embedder=minilm) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        question = {"role": "user", "content": "What is the capital of France?"}
        guard.complete([question], **GREEDY)
        assert not guard.complete([{"role": "system", "content": "Answer in Spanish."}, question], **GREEDY).cached
        earlier = [{"role": "user", "content": "Let's talk about Italy."}, {"role": "assistant", "content": "Sure."}]
        assert not guard.complete([*earlier, question], **GREEDY).cached
        assert not guard.complete([question], max_tokens=7, **GREEDY).cached
        assert not guard.complete([question], user="someone-else", **GREEDY).cached
        assert not guard.complete([{**question, "name": "bob"}], **GREEDY).cached  # who asks is part of it
        assert not Guard(fn, model="gpt-4o", cache=cache).complete([question], **GREEDY).cached
        assert guard.complete([{"role": "user", "content": "what is the capital of France"}], **GREEDY).cached


@pytest.mark.slow
def test_the_labelled_set_has_no_false_hits(minilm):
    """Store each pair's first question, ask its second: near misses must miss. The hit
    rate on paraphrases is what benchmarks/bench_cache.py reports; here it must be > 0."""
    pairs = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    hits = {("en", "paraphrase"): 0, ("en", "near_miss"): 0, ("zh", "paraphrase"): 0, ("zh", "near_miss"): 0}
    with SemanticCache(embedder=minilm) as cache:
        guard = Guard(lambda messages, max_tokens, temperature: "stored", model="gpt-4o-mini", cache=cache)
        for pair in pairs:
            guard.complete(pair["a"], user=pair["id"], **GREEDY)  # one partition per pair
            hits[pair["lang"], pair["label"]] += guard.complete(pair["b"], user=pair["id"], **GREEDY).cached
    assert hits["en", "near_miss"] == hits["zh", "near_miss"] == 0
    assert hits["en", "paraphrase"] > 0 and hits["zh", "paraphrase"] > 0


def test_same_details_reads_numbers_words_and_order():
    assert same_details("What is 2+2?", "what's 2 + 2")
    assert same_details("Convert 5 km to miles", "Please convert five km to miles!")
    assert same_details("三公里是多少米？", "3公里是多少米")
    assert same_details("二〇二四年春节是几月几号？", "2024年春节是几月几号")  # a year, digit by digit
    assert not same_details("二〇二四年春节是几月几号？", "二〇一四年春节是几月几号？")
    assert not same_details("Convert 5 km to miles", "Convert 5 miles to km")
    assert not same_details("What is 7 minus 3?", "What is 3 minus 7?")
    assert not same_details("Which foods contain gluten?", "Which foods don't contain gluten?")
    assert not same_details("How does HTTP work?", "How does HTTPS work?")
    assert same_details("How do I make guacamole?", "how do i make guacamolle")  # one typo in a long word
    assert not same_details("When was the Eiffel Tower built?", "Where was the Eiffel Tower built?")
    assert not same_details("Who is the CEO of Apple?", "Who was the CEO of Apple?")
    assert not same_details("What is your name?", "What is my name?")
    assert not same_details("Should I sell my shares?", "Must I sell my shares?")
    assert not same_details("Mix bleach and ammonia?", "Mix bleach or ammonia?")
    assert not same_details("他是谁", "她是谁") and not same_details("猫把狗咬了吗", "猫被狗咬了吗")
    assert not same_details("Is -40 degrees cold?", "Is 40 degrees cold?")
    assert not same_details("What is 15% of 200?", "What is 15 of 200?")
    assert same_details("What is 15% of 200?", "what's 15 percent of 200")
    assert not same_details("Track parcel 92748901234567890123", "Track parcel 92748901234567890199")
    assert not same_details("What is the sum of 1,2,3?", "What is the sum of 123?")
    assert same_details("Convert 1,500 km to miles", "convert 1500.0 km to miles")
    assert same_details("Could you please tell me what my balance is?", "What's my balance?")
    assert same_details("请问你能告诉我北京的人口吗", "北京的人口")
    assert same_details("Could you please tell me: what's the capital of france??", "What is the capital of France?")
    assert not same_details("Can you swim?", "Will you swim?")  # a question about you, not a polite frame
    assert not same_details("What can you do?", "What will you do?")
    assert not same_details("Call agent 007", "Call agent 7") and not same_details("Zip 02134", "Zip 2134")


@pytest.mark.parametrize(("asked", "stored"), [
    ("What is 6 - 3?", "What is 6 + 3?"), ("Is 7 < 5?", "Is 7 > 5?"), ("Solve x - 4 = 10", "Solve x + 4 = 10"),
    ("What is 12 / 4?", "What is 12 * 4?"), ("Convert 100$ to yen", "Convert 100€ to yen"), ("Is −5 < 3?", "Is 5 < 3?"),
    ("Какая столица Германии?", "Какая столица Франции?"), ("Ποια είναι η πρωτεύουσα της Γερμανίας;",
                                                          "Ποια είναι η πρωτεύουσα της Γαλλίας;"),
    ("ما هي عاصمة ألمانيا؟", "ما هي عاصمة فرنسا؟"), ("🍎?", "🍌?"),
])
def test_operators_symbols_and_every_script_are_details(asked, stored):
    assert not same_details(asked, stored)
    assert same_details(asked, asked.rstrip("?;؟") + "?")  # punctuation is not a detail


def test_details_read_any_text_without_failing():
    assert same_details("What is 6+3?", "what's 6 + 3")
    assert same_details("Is −5 cold?", "Is -5 cold?")  # the minus sign is a minus
    long_numeral = "五" * 5000  # more digits than Python prints as an int
    assert same_details(long_numeral, long_numeral + "？") and not same_details(long_numeral, "五" * 4999)


@pytest.mark.slow
def test_near_misses_in_operators_and_other_scripts_miss(minilm):
    """The embedder alone puts each of these pairs above the threshold."""
    fn = Answers()
    with SemanticCache(embedder=minilm) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        pairs = [("What is 6 + 3?", "What is 6 - 3?"), ("Какая столица Франции?", "Какая столица Германии?")]
        for stored, asked in pairs:
            guard.complete(stored, **GREEDY)
            assert not guard.complete(asked, **GREEDY).cached
            assert guard.complete(stored.rstrip("?"), **GREEDY).cached


def shared_between_processes(location) -> None:
    """An entry another process stores after this one opened the cache is a hit at this
    one's next lookup, and for a cache opened later."""
    script = script_prelude("the other process") + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_semantic import hashed_words
        from tokenguard import Guard
        from tokenguard.cache import SemanticCache
        with SemanticCache({str(location)!r}, embedder=hashed_words) as cache:
            Guard(answers, model="gpt-4o-mini", cache=cache).complete("Where is the Louvre?", temperature=0)
    """)
    answers, calls = answers_here("this process")
    with SemanticCache(location, embedder=hashed_words) as running:  # open before the other process writes
        guard = Guard(answers, model="gpt-4o-mini", cache=running)
        # Nothing stored yet: answered here, though not stored (a sampled request, temperature 1).
        assert guard.complete("Where is the Louvre?", temperature=1).text == "written by this process"
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        assert guard.complete("where is the louvre", temperature=0).text == "written by the other process"
    with SemanticCache(location, embedder=hashed_words) as reopened:
        reply = Guard(answers, model="gpt-4o-mini", cache=reopened).complete("Where is the Louvre??", temperature=0)
    assert reply.cached and calls == ["Where is the Louvre?"]


def test_entries_survive_a_restart_and_are_shared_between_processes(tmp_path):
    shared_between_processes(tmp_path / "semantic")


def keeps_at_most_max_entries(location) -> None:
    fn = Answers()
    with SemanticCache(location, embedder=hashed_words, max_entries=5) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        for i in range(8):
            guard.complete(f"Question number {i} about topic {i}", **GREEDY)
        assert len(cache) == 5
        assert not guard.complete("Question number 0 about topic 0", **GREEDY).cached  # evicted
        assert guard.complete("question number 7 about topic 7", **GREEDY).cached


def expires(location, ttl: float) -> None:
    fn = Answers()
    with SemanticCache(location, embedder=hashed_words, ttl=ttl) as expiring:
        guard = Guard(fn, model="gpt-4o-mini", cache=expiring)
        guard.complete("Short-lived question", **GREEDY)
        assert guard.complete("short-lived question", **GREEDY).cached
        time.sleep(2 * ttl)
        assert not guard.complete("short-lived question", **GREEDY).cached
        assert len(expiring) == 1 and fn.calls == 2  # the answer stored again after the miss


def test_it_keeps_at_most_max_entries_oldest_first_and_expires(tmp_path):
    keeps_at_most_max_entries(tmp_path / "bounded")
    expires(None, 0.05)


def test_large_groups_are_searched_through_ivf_and_still_hit(monkeypatch):
    monkeypatch.setattr(semantic_module, "IVF_FROM", 300)
    fn = Answers()
    with SemanticCache(embedder=hashed_words, scope="global", max_entries=10_000) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        for i in range(700):
            guard.complete(f"Tell me fact {i} about item{i} and thing{i * 7}", **GREEDY)
        hits = sum(guard.complete(f"tell me fact {i} about item{i} and thing{i * 7}!", **GREEDY).cached
                   for i in range(0, 700, 35))
    assert hits >= 19  # of 20: IVF may miss a neighbour now and then, never serve a wrong one


class TrainingGate:
    """Holds each IVF training at its start until :attr:`release` is set, so a test can
    see which lookups get through meanwhile. ``started`` is set when one waits there,
    ``finished`` once one has trained; ``trainings`` counts them. The real training
    runs; nothing is faked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.trainings = 0
        gate = self

        class GatedGroup(semantic_module._Group):
            def __init__(self, ids, vectors, dim, seen) -> None:
                trains = len(ids) >= semantic_module.IVF_FROM
                if trains:
                    gate.trainings += 1
                    gate.started.set()
                    gate.release.wait(60)  # only a bound on a broken test; the test sets it
                super().__init__(ids, vectors, dim, seen)
                if trains:
                    gate.finished.set()

        monkeypatch.setattr(semantic_module, "_Group", GatedGroup)


def _in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``work`` in a thread; the list receives its result."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    return thread, result


def lookups_go_on_while_a_group_trains(location, monkeypatch: pytest.MonkeyPatch) -> None:
    """While group A trains IVF (held at the gate), lookups of group B hit, a new group
    is read, and A's lookups use A's previous index, or, when A is read for the first
    time, wait for that one build."""
    monkeypatch.setattr(semantic_module, "IVF_FROM", 40)

    def in_a(i: int, text: str = "Tell me fact {i} about item{i}") -> list[dict[str, str]]:
        return [{"role": "system", "content": "Group A."}, {"role": "user", "content": text.format(i=i)}]

    fn = Answers()
    with SemanticCache(location, embedder=hashed_words) as cache:
        guard = Guard(fn, model="gpt-4o-mini", cache=cache)
        for i in range(40):  # the 40th is stored after its lookup: A trains at its next one
            guard.complete(in_a(i), **GREEDY)
        guard.complete("Where is the Louvre?", **GREEDY)
        gate = TrainingGate(monkeypatch)
        rebuilding, rebuilt = _in_thread(lambda: guard.complete(in_a(3, "tell me fact {i} about item{i}!"), **GREEDY))
        assert gate.started.wait(60)
        assert guard.complete("where is the louvre", **GREEDY).cached  # group B
        assert not guard.complete("A question nobody asked", **GREEDY).cached  # a new group, read and stored
        assert guard.complete(in_a(5, "tell me fact {i} about item{i}?"), **GREEDY).cached  # A's old index
        assert not gate.finished.is_set()  # all of that while A was training
        gate.release.set()
        rebuilding.join(60)
        assert rebuilt[0].cached and gate.trainings == 1
        assert guard.complete(in_a(39, "tell me fact {i} about item{i}??"), **GREEDY).cached  # A's IVF index

    with SemanticCache(location, embedder=hashed_words) as reopened:
        guard = Guard(fn, model="gpt-4o-mini", cache=reopened)
        gate = TrainingGate(monkeypatch)
        first, first_hit = _in_thread(lambda: guard.complete(in_a(7, "tell me fact {i} about item{i}"), **GREEDY))
        assert gate.started.wait(60)
        second, second_hit = _in_thread(lambda: guard.complete(in_a(8, "tell me fact {i} about item{i}"), **GREEDY))
        assert guard.complete("Where is the Louvre", **GREEDY).cached  # group B, read while A trains
        assert not gate.finished.is_set()
        gate.release.set()
        first.join(60)
        second.join(60)
        assert first_hit[0].cached and second_hit[0].cached
        assert gate.trainings == 1  # the second lookup of A waited for the first one's build


def test_lookups_of_other_groups_go_on_while_a_group_trains(tmp_path, monkeypatch):
    lookups_go_on_while_a_group_trains(tmp_path / "training", monkeypatch)


def corrupted_entry_is_a_miss(cache: SemanticCache, corrupt: Callable[[], None], caplog) -> None:
    """``corrupt()`` spoils the one entry's answer: the lookup is a miss with a warning,
    the entry is dropped and the fresh answer stored instead."""
    guard = Guard(Answers(), model="gpt-4o-mini", cache=cache)
    guard.complete("Where is the Louvre?", **GREEDY)
    corrupt()
    with caplog.at_level(logging.WARNING, logger="tokenguard.cache"):
        assert not guard.complete("where is the louvre", **GREEDY).cached
    assert "corrupted semantic cache entry" in caplog.text and len(cache) == 1  # the fresh answer
    assert guard.complete("Where is the Louvre", **GREEDY).cached


def test_threshold_one_hits_the_same_question_and_a_global_cache_is_shared(tmp_path):
    def ask(messages, max_tokens, temperature, user=None):  # takes the caller, as create() does
        return f"answer for {user}"

    with SemanticCache(embedder=hashed_words, threshold=1.0, scope="global") as cache:
        guard = Guard(ask, model="gpt-4o-mini", cache=cache)
        first = guard.complete("What is the capital of France?", user="ann", **GREEDY)
        again = guard.complete("What is the capital of France?", user="bob", **GREEDY)
        assert again.cached and again.text == first.text == "answer for ann"


def test_guard_warmup_loads_the_embedders_before_the_first_call():
    seen = []

    def embedder(texts):
        seen.append(list(texts))
        return hashed_words(texts)

    with SemanticCache(embedder=embedder) as cache:
        guard = Guard(Answers(), model="gpt-4o-mini", cache=cache, context=tg.context.Retrieval(embedder))
        guard.warmup()
        assert seen == [["warm up"], ["warm up"]]  # the cache's and the strategy's


def test_a_corrupted_entry_is_a_miss_with_a_warning(caplog):
    with SemanticCache(embedder=hashed_words) as cache:
        entries = cache._entries
        assert isinstance(entries, SQLiteSemanticEntries)

        def corrupt() -> None:
            with entries.db.connection() as conn:
                conn.execute("UPDATE entries SET answer = 'not json'")

        corrupted_entry_is_a_miss(cache, corrupt, caplog)


def test_bad_settings_fail_at_construction(tmp_path):
    from tokenguard.errors import ConfigError, StoreError

    with pytest.raises(ConfigError, match="threshold"):
        SemanticCache(embedder=hashed_words, threshold=1.5)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        SemanticCache(blocker, embedder=hashed_words)


def test_the_gpu_groups_removal_by_skipping_finds_what_an_index_that_removes_finds():
    # A GPU index cannot remove vectors: the GPU group skips removed ids instead. Its
    # bookkeeping is the same whatever the flat index, so a CPU one stands in for the
    # GPU's here (benchmarks/gpu_check.py runs it on a GPU).
    import faiss

    rng = np.random.default_rng(7)
    dim = 32

    def unit(n: int) -> np.ndarray:
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    ids = np.arange(1, 201, dtype=np.int64)
    vectors = unit(200)
    gpu = semantic_module._GpuGroup(ids, vectors, dim, seen=200, index_factory=faiss.IndexFlatIP)
    cpu = semantic_module._Group(ids, vectors, dim, seen=200)
    next_id = 201
    for step in range(60):
        if step % 3 == 0:
            new = np.arange(next_id, next_id + 10, dtype=np.int64)
            next_id += 10
            fresh = unit(10)
            gpu.add(new, fresh)
            cpu.add(new, fresh)
        else:
            gone = [*rng.choice(np.arange(1, next_id), size=16, replace=False).tolist(), 10_000]  # one never added
            gpu.remove(gone)
            cpu.remove(gone)
        query = unit(1)[0]
        found, expected = gpu.search(query, 4), cpu.search(query, 4)
        assert [i for _, i in found] == [i for _, i in expected]
        assert [s for s, _ in found] == pytest.approx([s for s, _ in expected], abs=1e-5)
        assert gpu.size == cpu.size
    assert gpu.outgrown()  # so many removed that a rebuild pays


def test_loaded_group_indexes_are_bounded_and_reloaded_when_asked_again(monkeypatch):
    monkeypatch.setattr(semantic_module, "LOADED_GROUPS", 3)
    with SemanticCache(embedder=hashed_words) as cache:
        guard = Guard(Answers(), model="gpt-4o-mini", cache=cache)
        for user in range(10):  # a group per user: each was kept loaded for good
            guard.complete("Where is the Louvre?", user=f"u{user}", **GREEDY)
        assert len(cache._groups) == 3
        assert guard.complete("where is the louvre", user="u0", **GREEDY).cached  # read again from the store
