"""Transformers backend on a real (tiny, randomly initialised) Llama saved to disk with
the bundled model's real tokenizer and chat template: loading, streaming, usage,
cancellation. Nothing downloads."""

from __future__ import annotations

import asyncio
import threading

import pytest

tf = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from tokenguard import Guard, InvalidRequest  # noqa: E402
from tokenguard.backends import Transformers  # noqa: E402
from tokenguard.tokens import get_tokenizer  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = get_tokenizer("SmolLM2-135M-Instruct")
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend,
        eos_token=tok.token_text(tok.eos_token_id),
        bos_token=tok.token_text(tok.bos_token_id),
    )
    fast.chat_template = tok.chat_template
    folder = tmp_path_factory.mktemp("tiny-llama")
    fast.save_pretrained(folder)
    config = tf.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backend(model_dir):
    return Transformers(str(model_dir))


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tokenguard-transformers"]


def test_backend_reports_usage_and_its_tokenizer_agrees(backend):
    chunks = list(backend.stream(MESSAGES, {"max_tokens": 6}))
    final = chunks[-1]
    assert final.finish_reason in ("length", "stop") and final.usage.output_tokens <= 6
    assert final.usage.input_tokens == backend.tokenizer().count_messages(MESSAGES)


def test_guard_over_transformers(backend):
    guard = Guard(backend, max_output_tokens=5, prices={backend.model: (0, 0)})
    reply = guard.complete(MESSAGES)
    assert reply.usage.input_tokens == guard.tokenizer.count_messages(MESSAGES)
    assert reply.usage.output_tokens <= 5 and reply.usage.cost_usd == 0
    assert guard.ledger.records()[0]["backend"] == "transformers"


def test_closing_the_stream_stops_generation(backend):
    guard = Guard(backend, max_output_tokens=400, prices={backend.model: (0, 0)})
    stream = guard.stream(MESSAGES)
    for _ in stream:
        break
    stream.close()
    assert not _workers()
    assert stream.reply.stop_reason in ("cancelled", "stop")


def test_async_over_transformers(backend):
    guard = Guard(backend, max_output_tokens=4, prices={backend.model: (0, 0)})
    reply = asyncio.run(guard.acomplete(MESSAGES))
    assert reply.usage.output_tokens <= 4


def test_loaded_model_needs_its_tokenizer():
    with pytest.raises(TypeError):
        Transformers(object())


def test_parameters_generate_cannot_take_are_refused_before_the_call(backend):
    guard = Guard(backend, max_output_tokens=4, prices={backend.model: (0, 0)})
    for params in ({"stop": ["\n"]}, {"seed": 3}, {"n": 2}, {"temperature": "0.7"}, {"max_tokens": 0}):
        with pytest.raises(InvalidRequest):
            guard.complete("hi", **params)
    assert guard.ledger.records() == []  # refused before anything ran
