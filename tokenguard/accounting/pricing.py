"""Prices: what a call cost in USD.

API models are priced from the ``genai-prices`` catalogue (input, output and
cached-input rates, tiers and dated price changes included). Local models get
user-set prices; the bundled model costs 0. A model with no known price costs
``None`` and warns once per process, never a guessed number.

>>> Pricing({"my-llama": (0.1, 0.2)}).cost("my-llama", input_tokens=1_000_000, output_tokens=0)
0.1
"""

from __future__ import annotations

import functools
import math
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from tokenguard.errors import ConfigError
from tokenguard.tokens.bundled import DEFAULT_MODEL_ALIASES

__all__ = ["Price", "PriceSpec", "Pricing", "UnknownPriceWarning"]

_PER = 1_000_000


class UnknownPriceWarning(UserWarning):
    """No price is known for a model, so its calls are metered with ``cost_usd=None``."""


@dataclass(frozen=True, slots=True)
class Price:
    """A flat price in USD per million tokens.

    ``cached_input`` is the rate for input tokens served from the provider's prompt
    cache; ``None`` means the same as ``input``.
    """

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """USD for a call; ``input_tokens`` includes ``cached_input_tokens``."""
        cached_rate = self.input if self.cached_input is None else self.cached_input
        uncached = max(input_tokens - cached_input_tokens, 0)
        return (
            uncached * self.input + cached_input_tokens * cached_rate + output_tokens * self.output
        ) / _PER


PriceSpec = Price | tuple[float, float] | tuple[float, float, float]
"""What ``prices={model: ...}`` accepts: a :class:`Price` or ``(in, out[, cached_in])``."""


class _Rate(Protocol):
    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float: ...


# Price keys for units a text call never reports (searches, audio, images, video,
# cache writes): they do not change a text call's cost.
_IGNORED_UNITS = ("search", "audio", "image", "video", "cache_write")
# Keys that price what we cannot count (characters, requests, pages, hours, reasoning
# split out of output): a model priced by them has no honest cost from token counts.
_FLAT_KEYS = {"input_mtok", "output_mtok", "cache_read_mtok"}
_REFRESH_S = 3600.0  # dated price changes are picked up within this


class _CatalogRate:
    """A model found in the genai-prices catalogue. Flat prices are computed here (the
    catalogue's own arithmetic costs ~100 µs a call); tiered ones by genai-prices, so
    they stay exact. Re-read every hour for dated price changes."""

    __slots__ = ("_expires", "_flat", "model", "provider")

    def __init__(self, model: Any, provider: Any) -> None:
        self.model = model
        self.provider = provider
        self._flat: Price | None = None
        self._expires = 0.0

    def _refresh(self) -> None:
        from genai_prices.types import TieredPrices

        prices = self.model.get_prices(datetime.now(timezone.utc))
        values = [getattr(prices, key) for key in _FLAT_KEYS]
        if any(isinstance(v, TieredPrices) for v in values):
            self._flat = None
        else:
            inp, out, cached = (getattr(prices, k) for k in ("input_mtok", "output_mtok", "cache_read_mtok"))
            self._flat = Price(
                float(inp or 0), float(out or 0), None if cached is None else float(cached)
            )
        self._expires = time.monotonic() + _REFRESH_S

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        if time.monotonic() >= self._expires:
            self._refresh()
        if self._flat is not None:
            return self._flat.cost(input_tokens, output_tokens, cached_input_tokens)
        from genai_prices import Usage

        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cached_input_tokens or None,
        )
        return float(self.model.calc_price(usage, self.provider).total_price)


def _priceable(model: Any) -> bool:
    """Whether every price of ``model`` applies to counts a text call has."""
    from genai_prices.types import ModelPrice

    options = [model.prices] if isinstance(model.prices, ModelPrice) else [c.prices for c in model.prices]
    for prices in options:
        keys = {k for k, v in prices.__dict__.items() if v is not None}  # none at all: free
        for key in keys - _FLAT_KEYS:
            if not any(unit in key for unit in _IGNORED_UNITS):
                return False
    return True


def _catalog_model(model: str) -> tuple[Any, Any] | None:
    """``(provider, model info)`` of ``model`` (or ``provider/model``) in genai-prices'
    catalogue, or ``None`` when it is not there."""
    try:
        from genai_prices.data_snapshot import get_snapshot
    except ImportError:  # pragma: no cover - a core dependency
        return None
    snapshot = get_snapshot()
    candidates: list[tuple[str, str | None]] = [(model, None)]
    if "/" in model:
        provider_name, _, rest = model.partition("/")
        candidates.append((rest, provider_name))
    for ref, provider_id in candidates:
        try:
            found: tuple[Any, Any] = snapshot.find_provider_model(ref, None, provider_id, None)
        except LookupError:
            continue
        return found
    return None


def _catalog_rate(model: str) -> _CatalogRate | None:
    """Find ``model`` (or ``provider/model``) in genai-prices; ``None`` when absent or
    priced by units that token counts cannot give."""
    found = _catalog_model(model)
    if found is None:
        return None
    provider, info = found
    return _CatalogRate(info, provider) if _priceable(info) else None


@functools.lru_cache(maxsize=1024)
def context_window(model: str) -> int | None:
    """The context window of an API model, in tokens, from genai-prices' catalogue
    (``"gpt-4o"``: 128,000); ``None`` when the catalogue does not know it."""
    found = _catalog_model(model)
    window = getattr(found[1], "context_window", None) if found is not None else None
    return int(window) if window else None


def _as_price(spec: PriceSpec) -> Price:
    if isinstance(spec, Price):
        rates: tuple[Any, ...] = (spec.input, spec.output, spec.cached_input)
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        rates = (*spec, None)[:3]
    else:
        rates = (None, None, None)
    if not (_is_rate(rates[0]) and _is_rate(rates[1]) and (rates[2] is None or _is_rate(rates[2]))):
        raise ConfigError(
            "a price is a Price or (usd_per_mtok_in, usd_per_mtok_out[, usd_per_mtok_cached_in]) "
            f"of finite numbers >= 0, got {spec!r}"
        )
    if isinstance(spec, Price):
        return spec
    return Price(float(rates[0]), float(rates[1]), None if rates[2] is None else float(rates[2]))


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_unknown(model: str) -> None:
    with _warned_lock:
        if model in _warned:
            return
        _warned.add(model)
    warnings.warn(
        f"no price is known for model {model!r}; its calls are metered with cost_usd=None. "
        f"Set one with prices={{{model!r}: (usd_per_mtok_in, usd_per_mtok_out)}}.",
        UnknownPriceWarning,
        stacklevel=3,
    )


class Pricing:
    """Resolves a model name to a price: user-set first, then the bundled model (0),
    then the genai-prices catalogue. Lookups are cached; the cache is bounded by the
    number of distinct model names a process uses.

    >>> Pricing().cost("gpt-4o", input_tokens=1000, output_tokens=100) > 0
    True
    """

    def __init__(self, prices: Mapping[str, PriceSpec] | None = None) -> None:
        self._user = {name: _as_price(spec) for name, spec in (prices or {}).items()}
        self._user_lower = {name.lower(): price for name, price in self._user.items()}
        self._cache: dict[str, _Rate | None] = {}
        self._lock = threading.Lock()

    def rate(self, model: str) -> _Rate | None:
        """The price object for ``model``, or ``None`` when none is known (no warning)."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        rate: _Rate | None = self._user.get(model) or self._user_lower.get(model.lower())
        if rate is None and (model in DEFAULT_MODEL_ALIASES or model.lower() in DEFAULT_MODEL_ALIASES):
            rate = Price(0.0, 0.0)
        if rate is None:
            rate = _catalog_rate(model)
        with self._lock:
            if len(self._cache) < 4096:  # bounded: model names come from code, rarely users
                self._cache[model] = rate
        return rate

    def known(self, model: str) -> bool:
        """Whether a price is known for ``model``."""
        return self.rate(model) is not None

    def cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        *,
        warn: bool = True,
    ) -> float | None:
        """USD for a call, or ``None`` (with a one-time warning) when the price is unknown."""
        rate = self.rate(model)
        if rate is None:
            if warn:
                _warn_unknown(model)
            return None
        return rate.cost(input_tokens, output_tokens, cached_input_tokens)
