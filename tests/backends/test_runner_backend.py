"""The bundled-runner backend adapter."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tokenguard.backends import Runner
from tokenguard.guard import Guard
from tokenguard.tokens import DEFAULT_MODEL_NAME, get_tokenizer

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


class StandInRunner:
    """Stands in for LlamaRunner: these tests are about the adapter calling it (the
    runner's own tests cover the runner). Its stream returns a final result the way a
    generator returns a value."""

    def __init__(self):
        self.tokenizer = get_tokenizer(DEFAULT_MODEL_NAME)
        self.calls = []

    def stream(self, *, messages, **params):
        self.calls.append((messages, params))
        yield "Four"
        yield "."
        return SimpleNamespace(
            prompt_tokens=self.tokenizer.count_messages(messages), token_ids=[1, 2, 3],
            cached_prompt_tokens=5, finish_reason="stop",
        )


def test_adapter_passes_params_and_reads_the_final_result():
    runner = StandInRunner()
    guard = Guard(Runner(runner))
    reply = guard.complete(MESSAGES, temperature=0.0)
    assert reply.text == "Four." and reply.stop_reason == "stop"
    assert (reply.usage.output_tokens, reply.usage.cached_input_tokens) == (3, 5)
    assert reply.usage.input_tokens == runner.tokenizer.count_messages(MESSAGES)
    assert reply.usage.cost_usd == 0.0  # the bundled model is free
    assert runner.calls[0][1] == {"max_tokens": 512, "temperature": 0.0}
    assert asyncio.run(guard.acomplete(MESSAGES)).text == "Four."


def test_tokenizer_without_loading_the_weights():
    backend = Runner()
    assert backend.tokenizer().count_messages(MESSAGES) == get_tokenizer(DEFAULT_MODEL_NAME).count_messages(MESSAGES)
    assert backend._runner is None


@pytest.mark.slow
def test_real_bundled_runner_end_to_end():
    pytest.importorskip("tokenguard.runner", reason="the bundled runner is not built yet")
    from tokenguard import runner as runner_module

    if not hasattr(runner_module, "LlamaRunner"):
        pytest.skip("tokenguard.runner.LlamaRunner is not available yet")
    guard = Guard(max_output_tokens=8)
    reply = guard.complete(MESSAGES)
    assert reply.usage.output_tokens <= 8
    assert reply.usage.input_tokens == guard.tokenizer.count_messages(MESSAGES)
    assert reply.stop_reason in ("stop", "length")
    pieces = list(guard.stream(MESSAGES))
    assert guard.ledger.records()[-1]["output_tokens"] <= 8 and pieces is not None
