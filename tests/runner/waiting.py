"""Polling in the runner's tests: a condition that must come true within a timeout."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds (checked every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
