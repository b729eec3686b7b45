"""@guard around existing model calls: strings, completions, chunk streams; sync and async."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace

import pytest

from tokenguard import Budget, Guard, InvalidRequest, Reply, guard, reply_of
from tokenguard.cache import ExactCache
from tokenguard.errors import BudgetExceeded, ConfigError, InputTooLong
from tokenguard.tokens import get_tokenizer

TOK = get_tokenizer("gpt-4o")


def test_a_prompt_string_reaches_the_function_as_messages():
    seen = []

    @guard(model="gpt-4o", max_output_tokens=64)
    def ask(messages):
        seen.append(messages)
        return "Paris"

    answer = ask("Capital of France?", user="ada", tags=["geo"])
    assert answer == "Paris" and isinstance(answer, str)  # what the function returns, of its type
    reply = reply_of(answer)
    assert isinstance(reply, Reply) and reply.text == "Paris"
    # As everywhere in the guard: a prompt string is one user message (a function written
    # for an OpenAI client would fail on a bare string).
    assert seen == [[{"role": "user", "content": "Capital of France?"}]]
    assert reply.usage.input_tokens == TOK.count_messages(reply.messages)
    row = ask.guard.ledger.records()[0]
    assert row["user"] == "ada" and row["tags"] == ["geo"]
    assert ask.__name__ == "ask"


def test_a_bare_decorator_cannot_know_the_model():
    with pytest.raises(ConfigError, match="pass model="):

        @guard
        def ask(messages):
            return "x"


def test_extra_arguments_reach_the_function():
    @guard(model="gpt-4o")
    def ask(messages, style, *, temperature=0.0):
        return f"{style}:{temperature}:{messages[-1]['content']}"

    assert ask([{"role": "user", "content": "hi"}], "terse", temperature=0.5) == "terse:0.5:hi"


def _completion(text, tool_calls=None, as_dict=False):
    if as_dict:
        return {
            "id": "c1",
            "choices": [{"message": {"content": text, "tool_calls": tool_calls}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": TOK.count(text)},
        }
    return SimpleNamespace(
        id="c1",
        choices=[SimpleNamespace(message=SimpleNamespace(content=text, tool_calls=tool_calls), finish_reason="stop")],
        usage=SimpleNamespace(prompt_tokens=12, completion_tokens=TOK.count(text), prompt_tokens_details=None),
    )


@pytest.mark.parametrize("as_dict", [False, True])
def test_an_openai_completion_comes_back_as_itself_with_its_tool_calls(as_dict):
    calls = [{"id": "t1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    made = []

    def create(messages, max_tokens):
        made.append(_completion("Hello", calls, as_dict))
        return made[-1]

    ask = guard(model="gpt-4o")(create)
    result = ask([{"role": "user", "content": "hi"}])
    assert type(result) is type(made[0]) or isinstance(result, dict)
    assert result == made[0] if as_dict else result is made[0]  # untouched: the guard changed nothing
    reply = reply_of(result)
    assert reply.text == "Hello" and (reply.usage.input_tokens, reply.usage.output_tokens) == (12, 1)
    assert reply.tool_calls == calls  # read from dicts and from objects alike


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_completion_that_calls_tools_is_never_cached_whatever_its_finish_reason(as_dict):
    # OpenAI ends a forced tool call (tool_choice naming the function) with "stop".
    calls = [{"id": "t1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    made = []

    def create(messages, max_tokens, temperature=None):
        made.append(_completion("", calls, as_dict))
        return made[-1]

    ask = guard(model="gpt-4o", cache=ExactCache())(create)
    first, second = ask("Weather?", temperature=0), ask("Weather?", temperature=0)
    assert len(made) == 2 and reply_of(first).stop_reason == reply_of(second).stop_reason == "tool_calls"
    assert (second["choices"][0]["message"] if as_dict else second.choices[0].message.__dict__)["tool_calls"] == calls

    def stream(messages, max_tokens, temperature=None):  # the same call, streamed
        made.append(None)
        yield {"choices": [{"delta": {"tool_calls": [{"index": 0, **calls[0]}]}, "finish_reason": None}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}

    streamed = guard(model="gpt-4o", cache=ExactCache())(stream)
    for _ in range(2):
        pieces = streamed("Weather?", temperature=0)
        assert list(pieces) == [] and pieces.reply.stop_reason == "tool_calls" and pieces.reply.tool_calls == calls
    assert len(made) == 4


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_completion_past_the_cap_comes_back_cut_and_says_length(as_dict):
    long = "word " * 50

    def create(messages, max_tokens):  # a server that ignores max_tokens
        return _completion(long, as_dict=as_dict)

    result = guard(model="gpt-4o", max_output_tokens=5)(create)("go")
    choice = result["choices"][0] if as_dict else result.choices[0]
    content = choice["message"]["content"] if as_dict else choice.message.content
    finish = choice["finish_reason"] if as_dict else choice.finish_reason
    assert TOK.count(content) == 5 and long.startswith(content) and finish == "length"
    assert reply_of(result).text == content and reply_of(result).stop_reason == "length"


def test_reply_of_something_no_guard_returned():
    with pytest.raises(InvalidRequest):
        reply_of("a plain string")


def test_function_returning_a_chunk_iterator_is_consumed_and_capped():
    def create(messages):
        return ({"choices": [{"delta": {"content": "word "}, "finish_reason": None}]} for _ in range(1000))

    ask = guard(model="gpt-4o", max_output_tokens=8)(create)
    reply = ask("go")
    assert reply.stop_reason == "length" and reply.usage.output_tokens == 8


def test_generator_function_returns_a_guarded_stream():
    @guard(model="gpt-4o")
    def ask(messages):
        yield "a"
        yield "b"

    stream = ask("hi")
    assert list(stream) == ["a", "b"] and stream.reply.text == "ab"


def test_async_function_and_async_generator():
    @guard(model="gpt-4o")
    async def ask(messages):
        return "async"

    @guard(model="gpt-4o")
    async def stream(messages):
        yield "x"
        yield "y"

    async def run():
        answer = await ask("hi")
        s = stream("hi")
        return answer, [p async for p in s], s.reply

    answer, pieces, final = asyncio.run(run())
    assert answer == "async" and reply_of(answer).stop_reason == "stop"
    assert pieces == ["x", "y"] and final.text == "xy"


def test_decorator_enforces_input_cap_and_budget_before_calling():
    calls = []

    @guard(model="gpt-4o", max_input_tokens=20, max_output_tokens=10, budget=Budget(tokens=60))
    def ask(messages, max_tokens):
        calls.append(messages)
        return "ok"

    with pytest.raises(InputTooLong):
        ask("long " * 100)
    ask("hi")
    ask("hi")
    with pytest.raises(BudgetExceeded):
        for _ in range(10):
            ask("hi")
    assert len(calls) < 10
    rows = ask.guard.ledger.records()
    assert rows[0]["stop_reason"] == "input_too_long" and rows[-1]["stop_reason"] == "budget_exceeded"


def test_with_a_budget_the_function_must_take_the_output_cap():
    with pytest.raises(ConfigError, match="takes no max_tokens"):

        @guard(model="gpt-4o", max_output_tokens=5, budget=Budget(tokens=200))
        def ask(messages):
            return "a reply the server made as long as it liked"

    handed = []

    @guard(model="gpt-4o", max_output_tokens=5, budget=Budget(tokens=200))
    def capped(messages, max_tokens):
        handed.append(max_tokens)
        return "ok"

    capped("hi")
    capped("hi", max_tokens=3)
    assert handed == [5, 3]


def test_a_guard_with_a_budget_refuses_a_function_without_the_output_cap_too():
    # Its completion may report any number of output tokens: 5,000 against a 1,000-token budget.
    def uncapped(messages):
        return {"choices": [{"message": {"role": "assistant", "content": "long"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 5000, "total_tokens": 5009}}

    with pytest.raises(ConfigError, match=r"uncapped\(\) takes no max_tokens"):
        Guard(uncapped, model="gpt-4o", max_output_tokens=100, budget=Budget(tokens=1000))
    assert Guard(uncapped, model="gpt-4o").complete("hi").usage.output_tokens == 5000  # metered; no budget to overspend


def test_decorator_takes_no_backend():
    with pytest.raises(ConfigError):
        guard(backend=object())


def test_a_function_with_a_user_parameter_is_handed_the_call_s_user():
    # OpenAI's create() takes user=; a wrapper that passes it on must not get its default.
    seen = []

    @guard(model="gpt-4o")
    def ask(messages, max_tokens, user=None):
        seen.append(user)
        return "ok"

    @guard(model="gpt-4o")
    def must_know(messages, user, max_tokens):
        seen.append(user)
        return "ok"

    ask("hi", user="alice")
    ask("hi")
    must_know("hi", user="bob")
    assert seen == ["alice", None, "bob"]
    assert [row["user"] for row in ask.guard.ledger.records()] == ["alice", None]


@pytest.mark.parametrize("shape", ["dict", "object"])
def test_a_cache_hit_of_a_function_returning_completions_is_a_completion_of_the_same_type(shape):
    # Code that reads completion.choices[0] must work on the second (cached) call as on the first.
    from openai.types.chat import ChatCompletion

    from tokenguard.cache import ExactCache

    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}
    make = dict if shape == "dict" else ChatCompletion.model_validate
    with ExactCache() as cache:
        @guard(model="gpt-4o", cache=cache)
        def ask(messages, max_tokens, temperature=1.0):
            return make(copy.deepcopy(body))

        first, hit = (ask("Capital of France?", temperature=0) for _ in range(2))
    assert type(hit) is type(first) and reply_of(hit).cached and not reply_of(first).cached
    as_dict = hit if isinstance(hit, dict) else hit.model_dump()
    assert as_dict["choices"][0]["message"]["content"] == "Paris."
    assert as_dict["usage"]["total_tokens"] == 0  # a hit bills nothing
    assert as_dict["id"] == f"chatcmpl-{reply_of(hit).request_id}"


@pytest.mark.parametrize("shape", ["dict", "object"])
def test_a_cache_hit_carries_nothing_of_the_completion_it_is_shaped_like(shape):
    # The hit is shaped like the last completion returned, here another question's
    # answer: two choices, log probabilities, a fingerprint and a refusal.
    from openai.types.chat import ChatCompletion

    from tokenguard.cache import ExactCache

    def completion(text, refusal=None):
        choices = [{"index": i, "message": {"role": "assistant", "content": f"{text} ({i})", "refusal": refusal},
                    "finish_reason": "stop", "logprobs": {"content": [{"token": "A", "logprob": -0.1,
                                                                       "bytes": None, "top_logprobs": []}]}}
                   for i in range(2)]
        body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                "system_fingerprint": "fp_1", "choices": choices,
                "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}
        return body if shape == "dict" else ChatCompletion.model_validate(body)

    with ExactCache() as cache:
        @guard(model="gpt-4o", cache=cache)
        def ask(messages, max_tokens, temperature=1.0):
            question = messages[-1]["content"]
            return completion("Paris", None) if "France" in question else completion("Other", "I can't say.")

        ask("Capital of France?", temperature=0)
        ask("Something else?", temperature=0)
        hit = ask("Capital of France?", temperature=0)
    as_dict = hit if isinstance(hit, dict) else hit.model_dump()
    assert reply_of(hit).cached and len(as_dict["choices"]) == 1
    [choice] = as_dict["choices"]
    assert choice["message"]["content"] == "Paris (0)" and choice["message"]["refusal"] is None
    assert choice["logprobs"] is None and as_dict["system_fingerprint"] is None


def test_a_cache_hit_is_of_the_type_the_same_kind_of_call_returned():
    # A function that streams when asked (as create(stream=True) does): the guard reads
    # the stream and gives the Reply; a hit of such a call is the Reply too.
    from tokenguard.cache import ExactCache

    def chunk(text, finish=None):
        return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}

    with ExactCache() as cache:
        @guard(model="gpt-4o-mini", cache=cache)
        def ask(messages, max_tokens, temperature, stream=False):
            text = "Answer to " + messages[-1]["content"]
            if stream:
                return iter([chunk(text), chunk("", "stop")])
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}

        ask("Warm-up?", temperature=0)
        miss, hit = (ask("What is 2+2?", temperature=0, stream=True) for _ in range(2))
        whole = ask("What is 2+2?", temperature=0)
    assert isinstance(miss, Reply) and isinstance(hit, Reply) and hit.cached and hit.text == miss.text
    assert isinstance(whole, dict) and not reply_of(whole).cached  # stream= is part of the key


def test_a_tool_call_delta_does_not_end_a_stream_its_finish_reason_does():
    from tokenguard.backends.openai_format import chunk_from_stream_item

    call = {"index": 0, "id": "t1", "type": "function", "function": {"name": "lookup", "arguments": '{"q"'}}
    delta = chunk_from_stream_item({"choices": [{"delta": {"tool_calls": [call]}, "finish_reason": None}]})
    # The server has more to send: a stream that ends here was cut off (OpenAICompatible
    # raises for one that says [DONE] before any finish reason), not a finished tool call.
    assert delta.calls_tools and delta.finish_reason is None


def test_tool_call_arguments_are_metered_when_the_server_reports_no_usage():
    call = {"index": 0, "id": "t1", "type": "function", "function": {"name": "lookup", "arguments": ""}}

    def stream(messages, max_tokens):  # a server without stream_options: no usage at the end
        yield {"choices": [{"delta": {"tool_calls": [call]}, "finish_reason": None}]}
        for part in ('{"city": ', '"Paris", ', '"days": 3}'):
            yield {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}}]}
        yield {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}

    pieces = guard(model="gpt-4o")(stream)("Weather?")
    assert list(pieces) == []  # no text for the reader
    generated = TOK.count('lookup{"city": "Paris", "days": 3}')
    assert pieces.reply.stop_reason == "tool_calls" and pieces.reply.usage.output_tokens == generated > 0


def test_a_stream_of_several_choices_is_read_as_its_first():
    def two_answers(messages, max_tokens):  # create(..., n=2, stream=True) interleaves them
        for index, text in ((0, "Red"), (1, "Blue"), (0, " apple."), (1, " sky.")):
            yield {"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield {"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]}

    pieces = guard(model="gpt-4o")(two_answers)("Name a colour and a thing of it.")
    assert "".join(pieces) == "Red apple." and pieces.reply.text == "Red apple."


def test_a_legacy_function_call_is_metered_as_a_tool_call():
    function = {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    def legacy(messages, max_tokens):
        yield {"choices": [{"delta": {"function_call": {"name": function["name"], "arguments": ""}}}]}
        yield {"choices": [{"delta": {"function_call": {"arguments": function["arguments"]}}}]}
        yield {"choices": [{"delta": {}, "finish_reason": "function_call"}]}

    def tools(messages, max_tokens):
        yield {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": function}]}}]}
        yield {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}

    old, new = (Guard(fn, model="gpt-4o").complete("Weather in Paris?") for fn in (legacy, tools))
    assert (old.stop_reason, new.stop_reason) == ("function_call", "tool_calls")
    assert old.usage.output_tokens == new.usage.output_tokens > 0  # generated, though no text


def test_methods_static_and_class_methods_are_guarded_with_their_instance():
    class Bot:
        name = "bot"

        @guard(model="gpt-4o")
        def ask(self, messages, max_tokens):
            return f"{self.name}: {messages[-1]['content']}"

        @guard(model="gpt-4o")
        @staticmethod
        def plain(messages, max_tokens):
            return f"static: {messages[-1]['content']}"

        @guard(model="gpt-4o")
        @classmethod
        def kind(cls, messages, max_tokens):
            return f"{cls.__name__}: {messages[-1]['content']}"

    bot = Bot()
    assert (bot.ask("hi"), bot.plain("hi"), Bot.plain("hi"), bot.kind("hi")) == (
        "bot: hi", "static: hi", "static: hi", "Bot: hi")  # self was taken for the messages
    assert reply_of(bot.ask("hi")).usage.output_tokens > 0


def test_arguments_reach_the_function_as_its_signature_names_them():
    seen = []

    @guard(model="gpt-4o", max_output_tokens=300)
    def ask(messages, max_tokens, style="plain", *, session=None, tags=None):
        seen.append((max_tokens, style, session, tags))
        return f"{style}: {messages[-1]['content']}"

    assert ask(messages="hi") == "plain: hi"  # the messages by their name
    assert ask("hi", 256, "fancy") == "fancy: hi"  # the cap, and what follows it, by position
    ask("hi", session="s-1", tags=["t"])  # the function names them: it is handed them
    assert seen == [(300, "plain", None, None), (256, "fancy", None, None), (300, "plain", "s-1", ["t"])]
    with pytest.raises(TypeError, match="takes the messages"):
        ask(style="fancy")
