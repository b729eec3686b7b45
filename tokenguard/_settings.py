"""Checks of numeric options, raising :class:`~tokenguard.ConfigError` with the option's
name. NaN passes a plain ``value < 0`` check (every comparison with it is false) and a
float where a token count belongs fails much later, on every call: both stop here."""

from __future__ import annotations

import math
import numbers
import operator

from tokenguard.errors import ConfigError


def token_count(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as a whole number of tokens >= ``minimum`` (a bool is not one)."""
    try:
        count = operator.index(value)  # type: ignore[arg-type]  # checked here
    except TypeError:
        count = None
    if isinstance(value, bool) or count is None or count < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return count


def seconds(name: str, value: object) -> float:
    """``value`` as a finite number of seconds > 0."""
    number = _finite(value)
    if number is None or number <= 0:
        raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
    return number


def limit(name: str, value: object) -> float:
    """``value`` as a finite number >= 0 (a budget's tokens or USD)."""
    number = _finite(value)
    if number is None or number < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (numpy's too), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
