"""The plain single-sequence loop: prefill the prompt, then decode one token at a time.

``LlamaRunner`` serves through the engine (paged KV, batching); this loop over one
contiguous cache is the model alone, which the benchmark times and the tests hold the
engine to (same greedy tokens). On CPU its decode steps run the model's native decode
step (:mod:`tokenguard.runner.model.native`). (``torch.compile`` of the decode step was
measured on CPU with torch 2.13, the whole step at a fixed context with the C++ wrapper:
62 s to compile and 14.7 ms a token against eager's 12.4, so it is not used.)
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import torch

from tokenguard.runner.model import ContiguousKVCache, LlamaModel
from tokenguard.runner.sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # bounds prefill activations and attention scores for long prompts


@torch.inference_mode()
def prefill(model: LlamaModel, input_ids: torch.Tensor, kv_cache: ContiguousKVCache,
            start: int = 0, chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run ``input_ids [T]`` at positions ``start...`` through the model, filling the cache
    ``chunk_size`` tokens at a time; return the float32 logits ``[vocab]`` after the last."""
    hidden = None
    for begin in range(0, input_ids.shape[0], chunk_size):
        chunk = input_ids[begin : begin + chunk_size]
        pos = start + begin
        kv_cache.begin(pos, chunk.shape[0])
        positions = torch.arange(pos, pos + chunk.shape[0], device=input_ids.device)
        hidden = model(chunk, positions, kv_cache)
    assert hidden is not None, "prefill needs at least one token"
    return model.compute_logits(hidden[-1:])[0]


@torch.inference_mode()
def decode_one_token(model: LlamaModel, token: torch.Tensor, position: int,
                     kv_cache: ContiguousKVCache) -> torch.Tensor:
    """Logits ``[vocab]`` after feeding one ``token [1]`` at ``position``."""
    kv_cache.begin(position, 1)
    positions = torch.tensor([position], device=token.device)
    return model.compute_logits(model(token, positions, kv_cache))[0]


def generate_tokens(model: LlamaModel, prompt_ids: Sequence[int], params: SamplingParams,
                    stop_token_ids: Collection[int] = ()) -> Iterator[int]:
    """Yield up to ``params.max_tokens`` new token ids, ending after a stop token.

    Lazy: each token is computed when asked for, so closing the iterator stops the
    work (nothing runs ahead of the consumer).
    """
    config, device = model.config, model.inv_freq.device
    kv_cache = ContiguousKVCache(
        config.num_layers, config.num_kv_heads, config.head_dim,
        capacity=len(prompt_ids) + params.max_tokens, dtype=model.dtype, device=device,
    )
    sampler = Sampler(params, config.vocab_size, prompt_ids, device)
    logits = prefill(model, torch.tensor(prompt_ids, dtype=torch.long, device=device), kv_cache)
    position = len(prompt_ids)
    for i in range(params.max_tokens):
        token = sampler(logits)
        yield token
        if token in stop_token_ids or i + 1 == params.max_tokens:
            return
        logits = decode_one_token(model, torch.tensor([token], device=device), position, kv_cache)
        position += 1
