"""Sampling parameters and the sampler that turns next-token logits into a token id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenguard.errors import InvalidRequest


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature=0`` is greedy decoding. ``top_k=0`` and ``top_p=1`` disable those
    filters. ``repetition_penalty`` (> 1 discourages repeats) applies the CTRL/transformers
    rule to every token of the prompt and the reply so far. ``seed`` makes sampling
    reproducible. Generation stops at ``max_tokens``, at an end-of-sequence or
    end-of-turn token, or at the first ``stop`` string (which the text then ends before).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks each next token of one sequence under :class:`SamplingParams`."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int],
                 device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from float32 ``logits [vocab]``."""
        p = self.params
        if self.seen is not None:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if p.greedy:
            token = int(logits.argmax())
        else:
            token = int(sample_top_k_top_p(logits, p.temperature, p.top_k, p.top_p, self.generator))
        if self.seen is not None:
            self.seen[token] = True
        return token


def sample_top_k_top_p(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """Sample one id from ``logits [vocab]`` after temperature, top-k and top-p filtering."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
