"""What a chat sends of its history: tool calls with their results, or neither."""

from __future__ import annotations

import pytest

from tokenguard import InvalidRequest
from tokenguard.context.messages import answered_calls_only
from tokenguard.tokens import get_tokenizer


def _asked(*ids: str, content: str | None = "") -> dict:
    calls = [{"id": i, "type": "function", "function": {"name": "weather", "arguments": "{}"}} for i in ids]
    return {"role": "assistant", "content": content, "tool_calls": calls}


def _result(call_id: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": "18 C"}


USER = {"role": "user", "content": "Weather in Paris and Rome?"}


def test_answered_calls_and_their_results_are_sent_as_they_are():
    messages = [USER, _asked("a", "b"), _result("a"), _result("b"), {"role": "assistant", "content": "Sunny."}]
    kept = answered_calls_only(messages)
    assert kept == messages and all(k is m for k, m in zip(kept, messages, strict=True))


def test_a_call_left_unanswered_goes_and_so_does_its_late_result():
    # Rome's result came a turn late, after the model had spoken: OpenAI would refuse both
    # the unanswered call and a result of no call before it.
    messages = [USER, _asked("a", "b"), _result("a"), {"role": "assistant", "content": "Paris: 18 C."}, _result("b")]
    assert answered_calls_only(messages) == [USER, _asked("a"), _result("a"), messages[3]]
    # Every call cut: the message still says something.
    assert answered_calls_only([USER, _asked("a", content=None), USER]) == [
        USER, {"role": "assistant", "content": ""}, USER]


def test_a_call_that_is_no_dict_is_left_for_the_count_to_refuse():
    messages = [USER, {"role": "assistant", "content": "", "tool_calls": ["weather()"]}, USER]
    kept = answered_calls_only(messages)
    assert kept == messages
    with pytest.raises(InvalidRequest, match="each tool call must be a dict"):
        get_tokenizer("gpt-4o").count_messages(kept)


def test_a_call_id_made_again_later_is_that_call_s():
    # Servers reuse ids ("call_0" in every answer): a result answers the latest call of its id.
    messages = [USER, _asked("a"), USER, _asked("a"), _result("a")]
    unanswered = {"role": "assistant", "content": ""}
    assert answered_calls_only(messages) == [USER, unanswered, USER, _asked("a"), _result("a")]
