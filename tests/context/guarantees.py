"""What every context strategy guarantees, as a check over random histories drawn by
hypothesis, with the real tokenizers (OpenAI's accounting and the bundled model's chat
template)."""

from __future__ import annotations

from hypothesis import strategies as st

from tokenguard import get_tokenizer

TOKENIZERS = {name: get_tokenizer(name) for name in ("gpt-4o", "SmolLM2-135M-Instruct")}
TEXT = st.lists(
    st.sampled_from([*"abc xyz,.!?\n", "人工智能", "🚀", "的", "é", "<|im_start|>"]), max_size=40
).map("".join)


@st.composite
def histories(draw, call_content=None):
    """A conversation: an optional system message, then turns of user and assistant
    messages, some assistants calling tools whose results follow; sometimes one huge
    message. ``call_content``: a tool-calling message's content (SmolLM2's template
    cannot render None)."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for n in range(draw(st.integers(1, 12))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if draw(st.integers(0, 3)) == 0:
            ids = [f"call_{n}_{k}" for k in range(draw(st.integers(1, 2)))]
            calls = [{"id": i, "type": "function", "function": {"name": "look", "arguments": "{}"}} for i in ids]
            messages.append({"role": "assistant", "content": call_content, "tool_calls": calls})
            messages += [{"role": "tool", "tool_call_id": i, "content": draw(TEXT)} for i in ids]
        messages.append({"role": "assistant", "content": draw(TEXT) * draw(st.sampled_from([1, 1, 1, 30]))})
    messages.append({"role": "user", "content": draw(TEXT)})
    return messages


def check_guarantees(history, fitted, budget, tokenizer, added=()):
    """``fitted`` keeps every rule for ``history`` within ``budget``; a system message
    starting with one of ``added`` is the strategy's own (a summary, recalled turns)."""

    def own(message):
        return message["role"] == "system" and str(message["content"]).startswith(tuple(added)) and added

    extra = [m for m in fitted if own(m)]
    assert len(extra) <= 1
    fitted = [m for m in fitted if not own(m)]
    assert tokenizer.count_messages(fitted) <= budget
    assert [m for m in history if m["role"] == "system"] == [m for m in fitted if m["role"] == "system"]
    assert fitted[-1] == history[-1]  # the newest user message, whole
    # Order kept: the result is a subsequence of the history.
    position = 0
    for message in fitted:
        position = history.index(message, position) + 1
    # A tool result never travels without its call, nor a call without its results.
    call_ids = {c["id"] for m in fitted for c in m.get("tool_calls") or ()}
    result_ids = {m["tool_call_id"] for m in fitted if m["role"] == "tool"}
    assert call_ids == result_ids
