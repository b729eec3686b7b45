"""The official `openai` client, as a new user writes it, against a real OpenAI-compatible
server on 127.0.0.1: decorated, or handed to the Guard as a backend."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types.chat import ChatCompletion
from openai_server import PROMPT_TOKENS, REPLY_WORDS

import tokenguard as tg

MODEL = "gpt-4o"


def test_the_readme_decorator_hands_the_cap_to_the_server_and_keeps_the_budget(openai_server):
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="sk-test")
    budget = tg.Budget(tokens=200, per="user")

    @tg.guard(model=MODEL, max_output_tokens=5, budget=budget)
    def ask(messages, max_tokens):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)

    completion = ask("Say hello.", user="alice")
    assert isinstance(completion, ChatCompletion)  # what the function returned, choices and all
    sent = openai_server.requests[-1]["body"]
    assert sent["max_tokens"] == 5 and sent["messages"] == [{"role": "user", "content": "Say hello."}]
    reply = tg.reply_of(completion)
    assert reply.text == completion.choices[0].message.content == "".join(REPLY_WORDS[:5])
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (PROMPT_TOKENS, 5)
    assert budget.spent(user="alice")["tokens"] == PROMPT_TOKENS + 5 <= 200


def test_an_async_client_gets_messages_from_a_prompt_string(openai_server):
    client = openai.AsyncOpenAI(base_url=openai_server.base_url, api_key="sk-test")

    @tg.guard(model=MODEL, max_output_tokens=64)
    async def aask(messages, max_tokens):
        return await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)

    completion = asyncio.run(aask("Say hi"))
    assert completion.choices[0].message.content == "".join(REPLY_WORDS)
    assert openai_server.requests[-1]["body"]["messages"] == [{"role": "user", "content": "Say hi"}]
    assert tg.reply_of(completion).stop_reason == "stop"


class _TeamAzureOpenAI(openai.AzureOpenAI):
    """An application's own subclass of the Azure client."""


@pytest.mark.parametrize("kind", [openai.AzureOpenAI, openai.AsyncAzureOpenAI, _TeamAzureOpenAI])
def test_an_azure_client_calls_the_deployment_its_model_names(openai_server, kind):
    root = openai_server.base_url.removesuffix("/v1")
    client = kind(azure_endpoint=root, api_key="az-key", api_version="2024-06-01")
    with tg.Guard(client, model=MODEL) as guard:
        assert guard.complete("hi").text == "".join(REPLY_WORDS)
    request = openai_server.requests[-1]
    assert request["path"] == f"/openai/deployments/{MODEL}/chat/completions?api-version=2024-06-01"
    assert request["headers"]["api-key"] == "az-key"
    # A client made for one deployment routes there already, whatever the model is called.
    pinned = kind(azure_endpoint=root, azure_deployment="prod-4o", api_key="az-key", api_version="2024-06-01")
    with tg.Guard(pinned, model=MODEL) as guard:
        guard.complete("hi")
    assert openai_server.requests[-1]["path"].startswith("/openai/deployments/prod-4o/chat/completions?")


def test_an_openai_client_is_a_backend_given_its_model(openai_server):
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="sk-test")
    with pytest.raises(tg.ConfigError, match="pass model="):
        tg.Guard(client)
    with tg.Guard(client, model=MODEL) as guard:
        reply = guard.complete("hi", user="ada")
    assert reply.text == "".join(REPLY_WORDS)
    request = openai_server.requests[-1]
    assert request["body"]["model"] == MODEL and request["headers"]["Authorization"] == "Bearer sk-test"
    # What the client is configured with goes along: it is billed to the right org and project.
    configured = openai.OpenAI(base_url=openai_server.base_url, api_key="sk-test", organization="org-1",
                               project="proj-1", default_headers={"X-Tenant": "acme"},
                               default_query={"api-version": "2024-06-01"}, timeout=3)
    with tg.Guard(configured, model=MODEL) as guard:
        guard.complete("hi")
    request = openai_server.requests[-1]
    assert request["path"].endswith("?api-version=2024-06-01")
    for name, value in (("OpenAI-Organization", "org-1"), ("OpenAI-Project", "proj-1"), ("X-Tenant", "acme"),
                        ("Authorization", "Bearer sk-test")):
        assert request["headers"][name] == value
    assert guard.backend.timeout == 3


def test_a_client_s_key_or_token_provider_is_asked_for_each_request(openai_server):
    # Nothing was sent (the client's auth headers are empty with a provider): a 401.
    keys = iter(f"sk-rotated-{i}" for i in range(1, 10))
    client = openai.OpenAI(base_url=openai_server.base_url, api_key=lambda: next(keys))
    with tg.Guard(client, model=MODEL) as guard:
        guard.complete("hi")
        guard.complete("hi again")
    assert [r["headers"]["Authorization"] for r in openai_server.requests[-2:]] == [
        "Bearer sk-rotated-1", "Bearer sk-rotated-2"]
    tokens = iter(f"aad-{i}" for i in range(1, 10))
    azure = openai.AzureOpenAI(azure_endpoint=openai_server.base_url.removesuffix("/v1"), api_version="2024-06-01",
                               azure_ad_token_provider=lambda: next(tokens))
    with tg.Guard(azure, model=MODEL) as guard:
        asyncio.run(guard.acomplete("hi"))
    assert openai_server.requests[-1]["headers"]["Authorization"] == "Bearer aad-1"


def test_a_client_s_own_timeout_class_and_openai_s_output_cap_name_are_kept():
    client = openai.OpenAI(api_key="sk-test", timeout=openai.Timeout(300, connect=2))
    backend = tg.Guard(client, model="o3-mini").backend
    assert (backend.timeout.connect, backend.timeout.read) == (2, 300)  # was the default 10 s / 60 s
    assert backend.max_tokens_param == "max_completion_tokens"  # OpenAI's reasoning models refuse max_tokens
