"""The bundled SmolLM2-135M GGUF in float32 against transformers loading the same file:
identical greedy tokens and next-token logits within 1e-3."""

from __future__ import annotations

import pytest
import torch

from tokenguard.runner.engine_process import EngineRecipe
from tokenguard.runner.generate import decode_one_token, prefill
from tokenguard.runner.model.kv_cache import ContiguousKVCache

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "人工智能的未来",
]
CHATS = [
    [{"role": "user", "content": "Say hello"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "What is the boiling point of water?"}],
]
NEW_TOKENS = 32


def all_prompt_ids(runner) -> list[list[int]]:
    return [runner.tokenizer.encode(p) for p in PROMPTS] + [runner.tokenizer.encode_chat(m) for m in CHATS]


def test_greedy_tokens_match_transformers(runner_fp32, hf_reference):
    for ids in all_prompt_ids(runner_fp32):
        ours = runner_fp32.generate(ids, max_tokens=NEW_TOKENS).token_ids
        with torch.no_grad():
            out = hf_reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        theirs = out[0, len(ids):].tolist()
        assert ours == theirs[: len(ours)], runner_fp32.tokenizer.decode(ids)
        # same length unless we stopped at an end-of-turn token transformers does not stop at
        assert len(ours) == len(theirs) or ours[-1] in runner_fp32.stop_token_ids


def test_next_token_logits_match_transformers(runner_fp32, hf_reference, default_gguf):
    # The runner's model lives in its engine process: the same recipe builds it here.
    model = EngineRecipe(default_gguf, "float32", "cpu").build_model()
    config = model.config
    worst = 0.0
    for ids in all_prompt_ids(runner_fp32):
        continuation = runner_fp32.generate(ids, max_tokens=8).token_ids
        cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                                  len(ids) + len(continuation), model.dtype)
        ours = [prefill(model, torch.tensor(ids), cache)]
        for i, token in enumerate(continuation[:-1]):
            ours.append(decode_one_token(model, torch.tensor([token]), len(ids) + i, cache))
        with torch.no_grad():
            full = torch.tensor([ids + continuation[:-1]])
            theirs = hf_reference(full).logits[0, len(ids) - 1 :].float()
        worst = max(worst, (torch.stack(ours) - theirs).abs().max().item())
    assert worst < 1e-3
