"""Relevant: the guarantees every strategy keeps (over random histories, with real
tokenizers), plus messages to keep, a fill bound, and a choice by relevance."""

from __future__ import annotations

import copy

from guarantees import TOKENIZERS, check_guarantees, histories
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenguard import InputTooLong
from tokenguard.context import ContextStrategy, Relevant, fingerprint

GPT = TOKENIZERS["gpt-4o"]


def test_it_is_a_context_strategy():
    assert isinstance(Relevant(), ContextStrategy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), budget=st.integers(5, 400), fill=st.none() | st.integers(0, 400))
def test_every_guarantee_holds_with_messages_to_keep(data, budget, fill):
    for name, tokenizer in TOKENIZERS.items():
        history = data.draw(histories(call_content=None if name == "gpt-4o" else ""))
        keep = data.draw(st.sets(st.integers(0, len(history) - 1), max_size=3))
        before = copy.deepcopy(history)
        try:
            fitted = Relevant().fit(history, budget, tokenizer, keep=keep, fill=fill)
        except InputTooLong:
            pass
        else:
            check_guarantees(history, fitted, budget, tokenizer)
            for i in keep:  # kept, unless it is a tool result without its call (never sent)
                assert history[i] in fitted or history[i]["role"] == "tool"
            if fill is not None:
                without_optional = Relevant().fit(history, budget, tokenizer, keep=keep, fill=0)
                assert tokenizer.count_messages(fitted) <= max(fill, tokenizer.count_messages(without_optional))
        assert history == before  # the input is not changed


def test_the_most_relevant_turns_win_and_keep_their_order():
    topics = ["kafka lag", "postgres vacuum", "redis eviction", "nginx timeouts"]
    history = [{"role": "user", "content": f"Note {i}: {topics[i % 4]} needs work, says team {i}."} for i in range(40)]
    question = {"role": "user", "content": "What do we know about postgres vacuum?"}
    fitted = Relevant().fit([*history, question], 80, GPT)
    assert fitted[-1] == question
    notes = fitted[:-1]
    assert notes and all("postgres vacuum" in m["content"] for m in notes)
    assert notes == sorted(notes, key=history.index)  # in their original order
    assert notes[-1] == history[-3]  # ties go to the newest


def test_chinese_turns_are_matched_by_their_character_pairs():
    # Chinese has no spaces: each sentence was one "word", and nothing ever matched.
    topics = ["账单代码", "部署脚本", "数据库备份", "监控告警"]
    history = [{"role": "user", "content": f"第{i}条笔记：{topics[i % 4]}需要一个负责人。"} for i in range(40)]
    question = {"role": "user", "content": "谁负责账单代码？"}
    notes = Relevant().fit([*history, question], 120, GPT)[:-1]
    assert len(notes) >= 3 and all("账单代码" in m["content"] for m in notes)


def test_with_nothing_in_common_it_keeps_the_newest_like_tail_only():
    history = [{"role": "user", "content": f"alpha {i}"} for i in range(30)]
    question = {"role": "user", "content": "zzz?"}
    fitted = Relevant().fit([*history, question], 40, GPT)
    assert fitted == [*history[-len(fitted) + 1 :], question] and len(fitted) > 2


def test_kept_messages_stay_and_fill_bounds_the_rest():
    history = [{"role": "user", "content": f"topic {i} note"} for i in range(30)]
    own = {"role": "assistant", "content": "my own older remark about topic 3"}
    messages = [*history[:10], own, *history[10:]]
    fitted = Relevant().fit(messages, 10_000, GPT, keep={10}, fill=60)
    assert own in fitted and GPT.count_messages(fitted) <= 60
    assert len(Relevant().fit(messages, 10_000, GPT, keep={10}, fill=0)) == 2  # own + newest user message


def test_what_must_be_kept_over_max_tokens_is_refused():
    messages = [{"role": "user", "content": "x " * 200}, {"role": "user", "content": "q"}]
    try:
        Relevant().fit(messages, 50, GPT, keep={0})
    except InputTooLong as error:
        assert error.limit == 50
    else:
        raise AssertionError("InputTooLong expected")


def test_a_turn_too_long_for_the_room_left_is_not_counted_whole():
    huge = {"role": "user", "content": "postgres vacuum " * 20_000}
    small = [{"role": "user", "content": f"postgres vacuum note {i}"} for i in range(5)]
    strategy = Relevant()
    fitted = strategy.fit([huge, *small, {"role": "user", "content": "postgres vacuum?"}], 100, GPT)
    assert huge not in fitted and len(fitted) == 6
    assert len(strategy._costs) == 5  # the small turns; the huge one was only counted up to the room


def test_fingerprints_see_content_role_and_tool_fields_only():
    message = {"role": "user", "content": "hi"}
    assert fingerprint(message) == fingerprint({"content": "hi", "role": "user", "cache_control": {"x": 1}})
    assert fingerprint(message) != fingerprint({"role": "assistant", "content": "hi"})
    assert fingerprint(message) != fingerprint({"role": "user", "content": "hi "})
    tool = {"role": "tool", "content": "42", "tool_call_id": "a"}
    assert fingerprint(tool) != fingerprint({**tool, "tool_call_id": "b"})
