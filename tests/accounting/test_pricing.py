"""Prices: genai-prices for API models, user-set for local ones, None when unknown."""

from __future__ import annotations

import math
import warnings

import pytest

from tokenguard import ConfigError
from tokenguard.accounting import Price, Pricing, UnknownPriceWarning
from tokenguard.tokens import DEFAULT_MODEL_NAME as BUNDLED_MODEL


def test_catalog_price_matches_genai_prices():
    from genai_prices import Usage, calc_price

    expected = calc_price(
        Usage(input_tokens=1000, output_tokens=200, cache_read_tokens=400), "gpt-4o"
    ).total_price
    got = Pricing().cost("gpt-4o", input_tokens=1000, output_tokens=200, cached_input_tokens=400)
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_cached_input_is_cheaper_than_fresh_input():
    p = Pricing()
    fresh = p.cost("gpt-4o", 1_000_000, 0)
    cached = p.cost("gpt-4o", 1_000_000, 0, cached_input_tokens=1_000_000)
    assert fresh == pytest.approx(2.5)  # $2.5 / MTok input in the bundled catalogue
    assert cached < fresh


def test_provider_prefixed_model_name():
    assert Pricing().cost("openai/gpt-4o", 1_000_000, 0) == pytest.approx(2.5)


def test_user_prices_win_and_accept_tuples():
    p = Pricing({"my-llama": (1.0, 2.0), "gpt-4o": Price(0.0, 0.0), "cache-me": (1.0, 1.0, 0.5)})
    assert p.cost("my-llama", 1_000_000, 500_000) == pytest.approx(2.0)
    assert p.cost("gpt-4o", 1000, 1000) == 0.0
    assert p.cost("cache-me", 1_000_000, 0, cached_input_tokens=1_000_000) == pytest.approx(0.5)


def test_bundled_model_is_free():
    assert Pricing().cost(BUNDLED_MODEL, 10_000, 10_000) == 0.0


def test_unknown_model_costs_none_and_warns_once():
    p = Pricing()
    name = "no-such-model-for-pricing-test"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert p.cost(name, 10, 10) is None
        assert p.cost(name, 10, 10) is None
        assert Pricing().cost(name, 10, 10) is None
    relevant = [w for w in caught if issubclass(w.category, UnknownPriceWarning)]
    assert len(relevant) == 1
    assert name in str(relevant[0].message)
    assert not p.known(name)


@pytest.mark.parametrize("spec", [
    (1.0,), (-1.0, 1.0), 0.5, "0.1,0.2", ("a", "b"), {"in": 1, "out": 2}, (math.nan, 1.0), (math.inf, 1.0),
    Price(-1, 2), Price(1, math.nan), (True, 1), (None, 1, 2), (1, 2, 3, 4),
])
def test_bad_price_spec_is_rejected(spec):
    with pytest.raises(ConfigError, match="a price is"):
        Pricing({"x": spec})


def test_tiered_prices_stay_exact():
    from genai_prices import Usage, calc_price

    for tokens in (1000, 300_000):  # below and above gemini-1.5-pro's 128k tier
        expected = calc_price(Usage(input_tokens=tokens, output_tokens=10), "gemini-1.5-pro").total_price
        assert Pricing().cost("gemini-1.5-pro", tokens, 10) == pytest.approx(float(expected), rel=1e-12)


def test_models_priced_by_units_we_cannot_count_have_no_cost():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownPriceWarning)
        assert Pricing().cost("mistral-ocr-2503", 1000, 10) is None  # priced per page


def test_catalogue_lookups_are_cached_after_the_first(monkeypatch):
    from tokenguard.accounting import pricing

    p = Pricing()
    first = p.cost("gpt-4o", 1000, 100, 10)
    looked_up = []
    monkeypatch.setattr(pricing, "_catalog_rate", lambda model: looked_up.append(model))
    for _ in range(100):
        assert p.cost("gpt-4o", 1000, 100, 10) == first
    assert looked_up == []  # the catalogue is searched once per model, not per call
