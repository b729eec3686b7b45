"""The sampler on synthetic logits: greedy, top-k, top-p, temperature, penalty, seeds."""

from __future__ import annotations

import pytest
import torch

from tokenguard.errors import InvalidRequest
from tokenguard.runner.sampling import Sampler, SamplingParams, sample


def logits(seed: int = 0, vocab: int = 100) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(params: SamplingParams, n: int = 200, seed: int = 0) -> list[int]:
    sampler = Sampler(params, 100, prompt_ids=[])
    x = logits(seed)
    return [sampler(x) for _ in range(n)]


def test_greedy_is_argmax():
    x = logits()
    assert Sampler(SamplingParams(), 100, [])(x) == int(x.argmax())


def test_top_k_1_equals_greedy():
    x = logits(3)
    assert set(draws(SamplingParams(temperature=1.5, top_k=1), seed=3)) == {int(x.argmax())}


def test_top_k_limits_the_support():
    top5 = set(torch.topk(logits(), 5).indices.tolist())
    got = set(draws(SamplingParams(temperature=5.0, top_k=5), n=500))
    assert got <= top5 and len(got) > 1


def test_top_p_keeps_the_nucleus():
    probs = logits().softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.5).sum()) + 1].tolist())
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.5), n=500))
    assert got <= nucleus


def test_seed_reproduces_and_differs():
    a = draws(SamplingParams(temperature=1.0, seed=7))
    b = draws(SamplingParams(temperature=1.0, seed=7))
    c = draws(SamplingParams(temperature=1.0, seed=8))
    assert a == b and a != c


def test_repetition_penalty_discourages_seen_tokens():
    x = torch.zeros(10)
    x[3], x[4] = 2.0, 1.9
    sampler = Sampler(SamplingParams(repetition_penalty=1.2), 10, prompt_ids=[3])
    assert sampler(x) == 4  # 2.0 / 1.2 < 1.9
    assert sampler(x) == 3  # 4 is now seen too: 1.9 / 1.2 < 2.0 / 1.2
    # negative logits are multiplied, pushing them further down
    s2 = Sampler(SamplingParams(repetition_penalty=2.0), 10, prompt_ids=[0, 1, 2, 3, 4, 6, 7, 8, 9])
    y = torch.full((10,), -1.0)
    y[5] = -1.5
    assert s2(y) == 5


def test_draws_follow_the_softmax():
    x = logits(vocab=8) / 3
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), 8, [])
    counts = torch.bincount(torch.tensor([sampler(x) for _ in range(6000)]), minlength=8).float()
    assert (counts / 6000 - x.softmax(-1)).abs().max() < 0.02


def test_a_batch_draws_what_each_sequence_draws_alone():
    x = torch.stack([logits(seed) for seed in range(4)])
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(),
              SamplingParams(temperature=2.0, top_k=5, top_p=0.8, repetition_penalty=1.3, seed=2),
              SamplingParams(repetition_penalty=1.5)]
    alone = [Sampler(p, 100, [1, 2, 3]) for p in params]
    batched = [Sampler(p, 100, [1, 2, 3]) for p in params]
    for _ in range(50):
        expected = [s(row) for s, row in zip(alone, x, strict=True)]
        assert sample(batched, x) == expected
    assert batched[2].seen is not None and alone[2].seen is not None
    assert torch.equal(batched[2].seen, alone[2].seen)


def test_greedy_rows_of_a_mixed_batch_are_the_argmax():
    x = torch.stack([logits(seed) for seed in range(3)])
    samplers = [Sampler(SamplingParams(), 100, []), Sampler(SamplingParams(temperature=1.0, seed=3), 100, []),
                Sampler(SamplingParams(), 100, [])]
    tokens = sample(samplers, x)
    assert tokens[0] == int(x[0].argmax()) and tokens[2] == int(x[2].argmax())


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5},
    {"repetition_penalty": 0},
    # Wrong types and sizes that got past the checks and failed inside the engine.
    {"max_tokens": 2.5}, {"max_tokens": None}, {"max_tokens": float("nan")}, {"temperature": "1"},
    {"top_k": 2.5}, {"top_p": None}, {"seed": 2**70}, {"seed": "abc"}, {"seed": 1.5}, {"stop": [1]},
    {"stop": 5},
])
def test_invalid_params_raise(bad):
    with pytest.raises(InvalidRequest):
        SamplingParams(**bad)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    params = SamplingParams(temperature=1e-38, seed=1)
    logits = torch.randn(1000)
    assert params.greedy and Sampler(params, 1000, [])(logits) == int(logits.argmax())


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ("END",)
