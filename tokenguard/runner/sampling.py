"""Sampling parameters and the sampler that turns next-token logits into a token id."""

from __future__ import annotations

import math
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
        if not isinstance(self.stop, Sequence) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequest(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = tuple(s for s in self.stop if s)
        if _integer(self.max_tokens) is None or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if _real(self.temperature) is None or not 0 <= self.temperature < math.inf:  # NaN fails too
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < _MIN_TEMPERATURE:
            self.temperature = 0.0  # logits divided by less overflow float32: it is greedy anyway
        if _integer(self.top_k) is None or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if _real(self.top_p) is None or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if _real(self.repetition_penalty) is None or not 0 < self.repetition_penalty < math.inf:
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (_integer(self.seed) is None or not _SEEDS[0] <= self.seed <= _SEEDS[1]):
            raise InvalidRequest(f"seed must be an integer in [{_SEEDS[0]}, {_SEEDS[1]}], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# The seeds torch's generators take, and the smallest temperature that does not overflow.
_SEEDS = (-(2**63), 2**64 - 1)
_MIN_TEMPERATURE = 1e-5


def _integer(value: object) -> int | None:
    """``value`` if it is an int (a bool is not one), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _real(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool or a string), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Sampler:
    """One sequence's sampling state: its parameters, random generator and the tokens a
    repetition penalty applies to. :func:`sample` picks the tokens of many at once."""

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

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no repetition penalty: the token is the argmax of the logits."""
        return self.seen is None and self.params.greedy

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from float32 ``logits [vocab]``."""
        return sample([self], logits[None])[0]


def sample(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int]:
    """The next token of each row of float32 ``logits [N, vocab]``, row ``i`` under
    ``samplers[i]``, read back to the host in one transfer for the whole batch.

    Sampled rows draw by the exponential race (the argmax of ``probs / E`` with ``E``
    exponential noise from the row's own generator picks each id with its probability),
    so a seeded sequence draws the same tokens from the same logits whatever it is
    batched with. (The logits themselves are batch-invariant in float32; the int4 and
    int8 CPU modes switch to a dense bfloat16 matmul from 8 rows a step, whose rounding
    differs, so a busy batch can change a later token, as in other batching servers.)
    """
    if all(s.plain_greedy for s in samplers):
        return logits.argmax(-1).tolist()
    penalized = [i for i, s in enumerate(samplers) if s.seen is not None]
    if penalized:
        logits = logits.clone()
        rows = torch.tensor(penalized, device=logits.device)
        part = logits[rows]
        seen = torch.stack([samplers[i].seen for i in penalized])  # type: ignore[misc]
        factor = part.new_tensor([samplers[i].params.repetition_penalty for i in penalized])[:, None]
        logits[rows] = torch.where(seen, torch.where(part > 0, part / factor, part * factor), part)
    choice = logits.argmax(-1)
    drawn = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        params = [samplers[i].params for i in drawn]
        probs = _filtered_probs(logits[rows], params)
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=samplers[i].generator)
                             for i in drawn])
        # A draw of exactly 0 would make a filtered-out token's 0 / 0 a NaN, which argmax picks.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        choice[rows] = (probs / noise).argmax(-1)
    tokens: list[int] = choice.tolist()
    for i in penalized:
        samplers[i].seen[tokens[i]] = True  # type: ignore[index]
    return tokens


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities ``[N, vocab]`` after each row's temperature, top-k and top-p."""
    logits = logits / logits.new_tensor([p.temperature for p in params])[:, None]
    top_k = [min(p.top_k, logits.shape[-1]) for p in params]
    if any(top_k):
        ranked = torch.topk(logits, max(top_k), dim=-1).values
        kth = ranked.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=logits.device)[:, None])
        unfiltered = torch.tensor([k == 0 for k in top_k], device=logits.device)[:, None]
        logits = logits.masked_fill((logits < kth) & ~unfiltered, float("-inf"))
    if any(p.top_p < 1 for p in params):
        top_p = logits.new_tensor([p.top_p if p.top_p < 1 else float("inf") for p in params])[:, None]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)
