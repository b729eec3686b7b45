"""What a client is told when a request fails: an HTTP status and an OpenAI-style body.

Every failure becomes an :class:`ApiError` before it is answered, and only what
:func:`api_error` puts in it reaches the client: the caller's own refusals in words
(a budget, a size limit, a malformed field), never a traceback, an upstream URL or
another user's data. Whatever is not a known refusal is logged in full on the server
and answered with a generic message.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta, timezone

from tokenguard.errors import BackendError, BudgetExceeded, ConfigError, InputTooLong, InvalidRequest, TokenGuardError

__all__ = ["ApiError", "api_error"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure as the client sees it: ``status``, and the ``error`` object of the body
    (``message``, ``type``, ``param``, ``code``), plus any response ``headers``.
    ``reason`` is the refusal's name in the metrics (``None``: not a refusal)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.reason = reason

    def body(self) -> dict[str, object]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    """A malformed request: 400."""
    return ApiError(400, message, param=param, reason="invalid_request")


def _seconds_to_next_window(window: str | None) -> int | None:
    """Seconds until a budget's UTC window (hour, day, month) starts again."""
    now = datetime.now(timezone.utc)
    if window == "hour":
        start = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    elif window == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    elif window == "month":
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        start = (first + timedelta(days=32)).replace(day=1)
    else:
        return None
    return max(1, math.ceil((start - now).total_seconds()))


def _budget_refusal(error: BudgetExceeded) -> ApiError:
    budget = error.budget
    per = getattr(budget, "per", "global")
    window = getattr(budget, "window", None)
    if error.unit == "usd":
        amounts = f"needs up to ${error.needed:.6f}, ${max(error.left, 0.0):.6f} left"
    else:
        amounts = f"needs up to {int(error.needed)} tokens, {max(int(error.left), 0)} left"
    scope = {"user": "your", "session": "this session's", "global": "the gateway's"}.get(per, "the")
    span = f" this {window}" if window else ""
    # The OpenAI client retries a 429 unless told not to; waiting seconds frees nothing here.
    headers = {"x-should-retry": "false"}
    retry = _seconds_to_next_window(window)
    if retry is not None:
        headers["retry-after"] = str(retry)
    kind = "spending" if error.unit == "usd" else "token"
    return ApiError(429, f"{scope} {kind} budget is spent{span}: this request {amounts}",
                    type="insufficient_quota", code="insufficient_quota", headers=headers, reason="budget_exceeded")


def _upstream_words(error: BackendError) -> str:
    """What an upstream said in its refusal (the backend's ``detail``), not its URL."""
    return (error.detail or "").strip()[:500] or "no reason given"


# Upstream answers that say the gateway is set up wrong (its key, its URL or model, a
# proxy's credentials), not that the client's request is: a 502, not the client's 400.
_GATEWAY_FAULTS = frozenset({401, 403, 404, 405, 407})


def api_error(error: BaseException, *, request_id: str | None = None, input_field: str = "messages") -> ApiError:
    """``error`` as the client may see it. Refusals keep their words (an input too long
    names ``input_field``: ``"prompt"`` on /v1/completions); a failing backend becomes
    502 without its URL or answer; anything else a generic 500 (logged here, with
    ``request_id``, to find it in the ledger)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, BudgetExceeded):
        return _budget_refusal(error)
    if isinstance(error, InputTooLong):
        return ApiError(400, str(error), code="context_length_exceeded", param=input_field,
                        reason="input_too_long")
    if isinstance(error, InvalidRequest):
        return invalid(str(error))
    if isinstance(error, BackendError):
        logger.warning("request %s: the backend failed: %s", request_id, error)
        said = f" (it answered {error.status})" if error.status else ""
        if error.status == 429 or error.status == 503:  # the upstream is busy: the client may come back
            return ApiError(error.status, f"the model backend is busy{said}; try again shortly",
                            type="api_error", code="upstream_busy", headers={"retry-after": "1"})
        if error.status is not None and 400 <= error.status < 500 and error.status not in _GATEWAY_FAULTS:
            # The upstream refused the request itself (too long for its model, a bad value):
            # the client's to fix, and not to retry. Its own words, without its URL.
            return ApiError(400, f"the model backend refused the request{said}: {_upstream_words(error)}",
                            code="upstream_refused")
        return ApiError(502, f"the model backend failed{said}", type="api_error", code="backend_error")
    if isinstance(error, TokenGuardError) and isinstance(error, ValueError) and not isinstance(error, ConfigError):
        # A request the backend itself cannot take (the bundled runner's KV pool is smaller than it).
        return invalid(str(error))
    logger.error("request %s failed", request_id, exc_info=error)
    suffix = f" (request {request_id})" if request_id else ""
    return ApiError(500, f"the gateway failed to answer{suffix}", type="api_error", code="internal_error")
