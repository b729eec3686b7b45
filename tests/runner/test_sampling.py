"""The sampler on synthetic logits: greedy, top-k, top-p, temperature, penalty, seeds."""

from __future__ import annotations

import pytest
import torch

from tokenguard.runner.sampling import Sampler, SamplingParams


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


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5},
    {"repetition_penalty": 0},
])
def test_invalid_params_raise(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ("END",)
