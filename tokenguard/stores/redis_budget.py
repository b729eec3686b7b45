"""Budget spend in Redis, shared by every process on every host that names the same
server and prefix.

Each operation is one Lua script, so Redis runs it atomically: no other client's
command runs between a reservation's check and its write. The keys of one budget scope
(``budget`` + ``key``, e.g. ``"user/day/tokens"`` + ``"user:alice|2025-06-01"``) are::

    <prefix>budget:<len(budget)>:<budget>:<key>:spend     hash  t, u (spent tokens, nano-USD)
                                                                rt, ru (held by open reservations)
    <prefix>budget:<len(budget)>:<budget>:<key>:holds     zset  reservation id -> expiry (ms, server clock)
    <prefix>budget:<len(budget)>:<budget>:<key>:amounts   hash  reservation id -> "<tokens> <nano_usd>"
    <prefix>budget:<len(budget)>:<budget>:<key>:expired   zset  expired hold id -> when it was dropped
                                                                (ms), until it is settled from the ledger
    <prefix>budget-reservation:<id>                       string the scope's key base; outlives the hold

A hold expires ``reservation_ttl_s`` after it was taken or last renewed, by the Redis
server's clock (hosts' clocks never matter). The process that holds it renews it every
third of that, so a call may run for as long as it needs; a process that dies stops
renewing, and its holds stop counting once they expire: every script that reads a
scope's totals first drops its expired holds (a sorted-set range on the expiry) from
``rt``/``ru``. A call whose hold expired anyway (its process was stalled past the TTL)
still counts what it spent when it settles, for ``settle_grace_s`` after the expiry.

A process that died between writing its call's ledger row and settling (the meter and
settle steps) would leave that spend uncounted. So an expired hold's id is also kept
in the scope's ``expired`` set, whichever process drops the hold (one with no ledger,
such as a dashboard reading usage, too), and a process with a ledger linked
(:func:`~tokenguard.accounting.budget.link_ledger`, as every Guard does) settles it to
what the call's ledger row says, exactly as the settle step would have: a usage read
in that scope does so before it answers, a reservation there has it done in the
background (it never waits on ledger lookups, and it is best effort: a failure is
logged and the id waits for the next try). An id whose call has no row is dropped (its
record stays, so a stalled process can still settle it), and one nobody settles is
forgotten after a week. Only one of the two ever counts: both take the reservation's
record first, and settling from the row leaves it marked ``spent``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from tokenguard._settings import limit, seconds
from tokenguard.errors import ConfigError
from tokenguard.stores.base import Refusal, SettledLookup, SettledLookups
from tokenguard.stores.redis_client import DEFAULT_PREFIX, RedisConnection, RedisURL, StoreUnavailable

__all__ = ["RedisBudgetStore"]

logger = logging.getLogger(__name__)

#: Lua numbers are doubles: amounts and limits are compared exactly up to 2**53 (9e15
#: tokens, or $9,007,199 in nano-USD). Larger ones are refused rather than rounded.
MAX_EXACT = 2**53

# -- the scripts ------------------------------------------------------------------------
#
_MIN_TTL_S = 0.5  # a hold's shortest life: its process renews it every third of that
# The longest durations accepted (a century): Redis's millisecond expiries must fit in 64 bits.
_MAX_S = 100 * 365 * 86_400.0
# Settles that Redis missed while fail-open, kept in memory to send once it answers.
_MAX_UNSENT = 10_000

# KEYS of the scope scripts: 1 spend, 2 holds, 3 amounts, 4 expired, 5 the reservation's record.

_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(v)
  return tonumber(v) or 0
end
-- HINCRBY with an integer's exact decimal text (never "-0" or an exponent).
local function add(key, field, n)
  if n ~= 0 then redis.call('HINCRBY', key, field, string.format('%d', n)) end
end
local function amount_of(text)
  local t, u = string.match(text, '^(%-?%d+) (%-?%d+)$')
  return tonumber(t), tonumber(u)
end
-- Remove a hold and what it held from the scope's totals.
local function drop_hold(spend, holds, amounts, id, text)
  local t, u = amount_of(text)
  add(spend, 'rt', -t)
  add(spend, 'ru', -u)
  redis.call('HDEL', amounts, id)
  redis.call('ZREM', holds, id)
end
-- Drop every hold whose expiry has passed: its process stopped renewing it. Each hold
-- is dropped once, so this costs O(1) per reservation over its life. Each dropped id
-- is kept in 'expired', whoever prunes it, until a process with a ledger settles it
-- from its call's row (or for a week: a call with no row by then never had one).
local function prune(spend, holds, amounts, expired, now)
  local ids = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  for _, id in ipairs(ids) do
    local text = redis.call('HGET', amounts, id)
    if text then drop_hold(spend, holds, amounts, id, text) else redis.call('ZREM', holds, id) end
    redis.call('ZADD', expired, now, id)
  end
  if #ids > 0 then redis.call('ZREMRANGEBYSCORE', expired, '-inf', now - 604800000) end
  return redis.call('ZCARD', expired)
end
-- A scope's keys are each missing or of their type: spend, amounts hashes; holds,
-- expired sorted sets; the record a string. Raises before anything is written.
local function check_types(keys)
  local want = {'hash', 'zset', 'hash', 'zset', 'string'}
  for i = 1, #keys do
    local kind = redis.call('TYPE', keys[i]).ok
    if kind ~= 'none' and kind ~= want[i] then
      return error('WRONGTYPE ' .. keys[i] .. ' holds a ' .. kind .. ', not a ' .. want[i] .. ' of tokenguard')
    end
  end
end
-- A finished window's keys expire some time after its end ('' = never). An expiry
-- already past is not set: Redis would delete what was just written.
local function expire_scope(keys, at, now)
  if at ~= '' and tonumber(at) > now then
    for i = 1, 4 do redis.call('PEXPIREAT', keys[i], at) end
  end
end
"""

# ARGV: id, tokens, nano_usd, limit_tokens ('' none), limit_nano_usd ('' none), ttl_ms,
# record_ttl_ms, scope, expire_at_ms ('' never).
# Returns {'ok', expired ids waiting}, or {unit, needed, left}: the same decision as
# base.check_reservation.
_RESERVE = _LUA_COMMON + """
local now = now_ms()
local owner = redis.call('GET', KEYS[5])
if owner then
  -- A repeat of this reservation (a retry after a lost reply) changes nothing.
  if owner == ARGV[8] then return {'ok', 0} end
  return redis.error_reply('reservation id ' .. ARGV[1] .. ' is already used by another budget scope')
end
-- Redis does not undo a script's writes when a later command fails, so a key of the
-- wrong type is refused before any: totals held for a hold never written would never expire.
check_types(KEYS)
local waiting = prune(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now)
local totals = redis.call('HMGET', KEYS[1], 't', 'u', 'rt', 'ru')
local spent_t, spent_u, held_t, held_u = num(totals[1]), num(totals[2]), num(totals[3]), num(totals[4])
local tokens, nano_usd = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] ~= '' and spent_t + held_t + tokens > tonumber(ARGV[4]) then
  return {'tokens', tokens, tonumber(ARGV[4]) - spent_t - held_t}
end
if ARGV[5] ~= '' and spent_u + held_u + nano_usd > tonumber(ARGV[5]) then
  return {'nano_usd', nano_usd, tonumber(ARGV[5]) - spent_u - held_u}
end
add(KEYS[1], 'rt', tokens)
add(KEYS[1], 'ru', nano_usd)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])
redis.call('SET', KEYS[5], ARGV[8], 'PX', ARGV[7])
expire_scope(KEYS, ARGV[9], now)
return {'ok', waiting}
"""

# ARGV: id, tokens, nano_usd, scope, expire_at_ms. Returns 1 if it spent, 0 if the
# reservation was already settled or released (or never made here).
_SETTLE = _LUA_COMMON + """
local now = now_ms()
local text = redis.call('HGET', KEYS[3], ARGV[1])
if text then
  drop_hold(KEYS[1], KEYS[2], KEYS[3], ARGV[1], text)
elseif redis.call('GET', KEYS[5]) ~= ARGV[4] then
  return 0
end
-- Without a hold but with its record, the hold expired while the call ran: the tokens
-- were spent all the same, so they count (and are no longer to settle from the ledger).
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[5])
add(KEYS[1], 't', tonumber(ARGV[2]))
add(KEYS[1], 'u', tonumber(ARGV[3]))
expire_scope(KEYS, ARGV[5], now)
return 1
"""

# ARGV: id, scope. Returns 1 if it dropped the reservation, 0 if it was already gone.
_RELEASE = _LUA_COMMON + """
if redis.call('GET', KEYS[5]) ~= ARGV[2] then return 0 end
local text = redis.call('HGET', KEYS[3], ARGV[1])
if text then drop_hold(KEYS[1], KEYS[2], KEYS[3], ARGV[1], text) end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[5])
return 1
"""

# ARGV: id, scope, tokens ('' for a call with no ledger row, or one that spent
# nothing), nano_usd, expire_at_ms. Settles an expired hold of a dead process from its
# call's ledger row: 1 if it counted, 0 if there was nothing (left) to count.
_SETTLE_EXPIRED = _LUA_COMMON + """
redis.call('ZREM', KEYS[4], ARGV[1])
-- Without its record the call settled or released itself (late), or its grace is over.
if ARGV[3] == '' or redis.call('GET', KEYS[5]) ~= ARGV[2] then return 0 end
-- Marked rather than deleted: a late settle of a call admitted fail-open (_SPEND) then
-- counts nothing more.
redis.call('SET', KEYS[5], 'spent', 'KEEPTTL')
add(KEYS[1], 't', tonumber(ARGV[3]))
add(KEYS[1], 'u', tonumber(ARGV[4]))
expire_scope(KEYS, ARGV[5], now_ms())
return 1
"""

# KEYS: spend, holds, amounts, expired. Returns {t, u, rt, ru} without
# expired holds, and the expired ids waiting to be settled from the ledger.
_USAGE = _LUA_COMMON + """
local waiting = prune(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now_ms())
local totals = redis.call('HMGET', KEYS[1], 't', 'u', 'rt', 'ru')
return {num(totals[1]), num(totals[2]), num(totals[3]), num(totals[4]), waiting}
"""

# KEYS: holds, record. ARGV: id, ttl_ms, record_ttl_ms. Extends a live hold; 1 if it
# did, 0 if the hold is gone or already expired (an expired hold is never revived: its
# room may already be someone else's).
_RENEW = _LUA_COMMON + """
local now = now_ms()
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# ARGV: tokens, nano_usd, expire_at_ms, record_ttl_ms, id, scope. Spend without a
# reservation: a call admitted fail-open while Redis was unreachable settles here, once:
# the record it marks 'spent' makes a repeat (a retry after a lost reply) spend nothing.
# Where the reservation did run (Redis was only slow: its reply was lost), its record is
# the scope's and its hold is dropped, as _SETTLE does. 1 if it spent.
_SPEND = _LUA_COMMON + """
local now = now_ms()
local owner = redis.call('GET', KEYS[5])
if owner and owner ~= ARGV[6] then return 0 end
if owner then
  local text = redis.call('HGET', KEYS[3], ARGV[5])
  if text then drop_hold(KEYS[1], KEYS[2], KEYS[3], ARGV[5], text) end
  redis.call('ZREM', KEYS[4], ARGV[5])
end
redis.call('SET', KEYS[5], 'spent', 'PX', ARGV[4])
add(KEYS[1], 't', tonumber(ARGV[1]))
add(KEYS[1], 'u', tonumber(ARGV[2]))
expire_scope(KEYS, ARGV[3], now)
return 1
"""


# -- windows ----------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _window_end(window: str) -> datetime | None:
    """When the UTC window a budget key ends in (``"2025-06-01T13"``, ``"2025-06-01"``,
    ``"2025-06"``: Budget's hour, day and month) is over; ``None`` for no window."""
    for fmt, step in (("%Y-%m-%dT%H", timedelta(hours=1)), ("%Y-%m-%d", timedelta(days=1))):
        try:
            return datetime.strptime(window, fmt).replace(tzinfo=timezone.utc) + step
        except ValueError:
            pass
    try:
        start = datetime.strptime(window, "%Y-%m").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


def _at_most_a_century(name: str, value: float) -> float:
    """``value``, or :class:`~tokenguard.ConfigError` past :data:`_MAX_S` (Redis would
    refuse its expiries in every script; ``None`` is "forever" where it is allowed)."""
    if value > _MAX_S:
        raise ConfigError(f"{name} must be at most a century ({_MAX_S:g} s), got {value!r}")
    return value


class _Scope:
    """The Redis keys of one budget scope (see the module's docstring)."""

    __slots__ = ("amounts", "base", "expired", "holds", "spend")

    def __init__(self, base: str) -> None:
        self.base = base
        self.spend = f"{base}:spend"
        self.holds = f"{base}:holds"
        self.amounts = f"{base}:amounts"
        self.expired = f"{base}:expired"

    @property
    def own(self) -> list[str]:
        """The scope's own keys: spend, holds, amounts, expired."""
        return [self.spend, self.holds, self.amounts, self.expired]

    def keys(self, record: str) -> list[str]:
        """The scope scripts' KEYS: its own and one reservation's record."""
        return [*self.own, record]


@dataclass(frozen=True, slots=True)
class _Settlement:
    """A settle to send (and to keep while Redis cannot take it, fail-open):
    ``admitted`` for a call admitted fail-open (sent as plain spend), else the settle of
    a reservation."""

    admitted: bool
    reservation_id: str
    budget: str
    key: str
    tokens: int
    nano_usd: int


# Stores whose per-process state a forked child must not inherit.
_STORES: weakref.WeakSet[RedisBudgetStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forget_process_state()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _renew_loop(ref: weakref.ReferenceType[RedisBudgetStore], stop: threading.Event, interval: float) -> None:
    """The renewal thread: every ``interval``, extend the holds this process has open,
    and retry the settles Redis missed (it may be back while this process is idle). It
    holds the store only weakly, so a store nobody uses any more is collected."""
    while not stop.wait(interval):
        store = ref()
        if store is None:
            return
        store._renew_open_holds()
        store._send_unsent_later()
        del store


class RedisBudgetStore:
    """A :class:`~tokenguard.stores.BudgetStore` in Redis, which processes on many hosts
    share. ``Budget(store="redis://host:6379/0")`` selects it; see
    :mod:`tokenguard.stores.redis_client` for the URL's options, which the keyword
    arguments override.

    Every operation is one atomic Lua script (loaded once, then called by SHA1): a
    reservation checks exact input + the output cap against ``spent + held`` and holds
    it in one step, a settle replaces the hold with the actual use, a release drops it.
    Decisions are the same as the SQLite store's, down to the refusal's numbers.

    - ``prefix``: every key starts with it (one tenant per prefix).
    - ``reservation_ttl_s``: a hold this process stops renewing (it died, or was frozen
      that long) stops counting that long after its last renewal. This process renews
      its open holds every third of it, in a daemon thread.
    - ``settle_grace_s``: how long after its hold expired a call can still settle (its
      spend counted) or release.
    - ``keep_windows_s``: a windowed budget's keys (``...|2025-06-01``) expire this long
      after the window ends (``None``: never). A :class:`~tokenguard.Budget` only reads
      its current window; the ledger keeps the history.
    - ``fail_open``: while Redis cannot be reached (or is full, or busy in another
      client's script), ``False`` (the default, "fail closed") raises
      :class:`~tokenguard.stores.StoreUnavailable` from ``reserve``, ``settle`` and
      ``release``, so a guarded call is refused before its backend runs. ``True`` lets
      ``reserve`` admit the call unmetered (a warning is logged once per outage): it is
      settled as plain spend if Redis is back by then; a settle that Redis misses is
      kept in this process (up to 10,000 of them) and sent in the background once
      Redis answers again, or at :meth:`close`; those of a process that ends before
      then are not counted. Choose it only where an outage must not stop traffic and
      a budget may be overrun while it lasts. ``usage`` raises either way: there is no
      number to report.

    Durations are finite and at most a century; :class:`~tokenguard.ConfigError`
    otherwise.

    Needs Redis >= 6.2 (a primary: the scripts write). Redis Cluster is not supported:
    a release finds its scope through a key in another slot.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        fail_open: bool | None = None,
        reservation_ttl_s: float | None = None,
        settle_grace_s: float = 86_400.0,
        keep_windows_s: float | None = 7 * 86_400.0,
    ) -> None:
        parsed = RedisURL.parse(url)
        self.prefix = prefix if prefix is not None else parsed.prefix if parsed.prefix is not None else DEFAULT_PREFIX
        self.fail_open = bool(fail_open if fail_open is not None else parsed.fail_open)
        ttl = reservation_ttl_s if reservation_ttl_s is not None else parsed.reservation_ttl_s
        self.reservation_ttl_s = 60.0 if ttl is None else _at_most_a_century(
            "reservation_ttl_s", seconds("reservation_ttl_s", ttl))
        if self.reservation_ttl_s < _MIN_TTL_S:  # renewed every third of it, over the network
            raise ConfigError(f"reservation_ttl_s must be at least {_MIN_TTL_S:g} s, got {self.reservation_ttl_s:g}")
        self.settle_grace_s = _at_most_a_century("settle_grace_s", limit("settle_grace_s", settle_grace_s))
        self.keep_windows_s = None if keep_windows_s is None else _at_most_a_century(
            "keep_windows_s", limit("keep_windows_s", keep_windows_s))
        self.redis = RedisConnection(parsed)
        self._ttl_ms = max(1, round(self.reservation_ttl_s * 1000))
        self._record_ttl_ms = self._ttl_ms + round(self.settle_grace_s * 1000)
        self._reserve = self.redis.script(_RESERVE)
        self._settle = self.redis.script(_SETTLE)
        self._release = self.redis.script(_RELEASE)
        self._usage = self.redis.script(_USAGE)
        self._renew = self.redis.script(_RENEW)
        self._spend = self.redis.script(_SPEND)
        self._settle_expired = self.redis.script(_SETTLE_EXPIRED)
        self._lookups = SettledLookups()
        self._forget_process_state()
        _STORES.add(self)

    def _forget_process_state(self) -> None:
        """This process's own state: the holds it renews, the calls it admitted while
        Redis was down and the settles Redis missed, the scopes whose expired holds are
        to settle, its threads. A forked child starts with none of it (the parent still
        owns those holds and settles)."""
        self._lock = threading.Lock()
        self._open: dict[str, tuple[str, str]] = {}  # reservation id -> (holds key, record key)
        self._admitted: set[str] = set()  # reservation ids admitted fail-open
        self._unsent: deque[_Settlement] = deque()  # settles Redis missed (fail-open), oldest first
        self._overflowed = False  # _unsent was full and a settle was not kept (warned once)
        self._to_settle: dict[str, str] = {}  # scope base -> budget key: expired holds waiting
        self._outage = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._chores: threading.Thread | None = None

    # -- keys ------------------------------------------------------------------------

    def _scope(self, budget: str, key: str) -> _Scope:
        # The budget's length makes the split unambiguous whatever either contains.
        return _Scope(f"{self.prefix}budget:{len(budget)}:{budget}:{key}")

    def _record(self, reservation_id: str) -> str:
        return f"{self.prefix}budget-reservation:{reservation_id}"

    def _expire_at_ms(self, key: str) -> str:
        """When a key's window's state may go, in epoch ms ('' = keep it)."""
        if self.keep_windows_s is None:
            return ""
        end = _window_end(key.rpartition("|")[2])
        if end is None:
            return ""
        return str(round((end.timestamp() + self.keep_windows_s) * 1000))

    # -- outages -----------------------------------------------------------------------

    def _unavailable(self, error: StoreUnavailable, doing: str) -> None:
        """Fail closed (raise ``error``) or, fail-open, log the outage once and go on."""
        if not self.fail_open:
            raise error
        with self._lock:
            first, self._outage = not self._outage, True
        if first:
            logger.warning("budget store unreachable, admitting calls unmetered (fail_open=True) while %s: %s",
                           doing, error)

    def _reachable(self) -> None:
        """Redis answered: end the outage, and send the settles it missed."""
        if self._outage:
            with self._lock:
                was, self._outage = self._outage, False
            if was:
                logger.warning("budget store %s reachable again", self.redis.url.display)
        self._send_unsent_later()

    def _send_unsent_later(self) -> None:
        """Have the chores thread send the settles Redis missed, if there are any."""
        if self._unsent:
            with self._lock:
                self._start_chores()

    def _keep_unsent(self, settle: _Settlement) -> None:
        """Keep a settle Redis missed (fail-open) to send once it answers, up to
        :data:`_MAX_UNSENT`; past that it is not counted (warned once per backlog)."""
        with self._lock:
            if len(self._unsent) < _MAX_UNSENT:
                self._unsent.append(settle)
                return
            first, self._overflowed = not self._overflowed, True
        if first:
            logger.warning("budget store %s: %d settles wait for Redis; later ones are not counted",
                           self.redis.url.display, _MAX_UNSENT)

    # -- the BudgetStore protocol --------------------------------------------------------

    def reserve(
        self,
        reservation_id: str,
        budget: str,
        key: str,
        tokens: int,
        nano_usd: int,
        limit_tokens: int | None,
        limit_nano_usd: int | None,
    ) -> Refusal | None:
        for value in (tokens, nano_usd, limit_tokens, limit_nano_usd):
            if value is not None and abs(value) > MAX_EXACT:
                raise ConfigError(
                    f"the Redis budget store compares amounts exactly only up to 2**53 (tokens, or nano-USD: "
                    f"$9,007,199); got {value}"
                )
        scope, record = self._scope(budget, key), self._record(reservation_id)
        args: list[str | int] = [
            reservation_id, int(tokens), int(nano_usd),
            "" if limit_tokens is None else int(limit_tokens),
            "" if limit_nano_usd is None else int(limit_nano_usd),
            self._ttl_ms, self._record_ttl_ms, scope.base, self._expire_at_ms(key),
        ]
        try:
            reply = self.redis.run(self._reserve, scope.keys(record), args, "reserving")
        except StoreUnavailable as error:
            self._unavailable(error, "reserving")
            with self._lock:
                self._admitted.add(reservation_id)
            return None
        self._reachable()
        if reply[0] != "ok":
            return Refusal(str(reply[0]), int(reply[1]), int(reply[2]))
        settle_expired = bool(int(reply[1]) and self._lookups)
        with self._lock:
            self._open[reservation_id] = (scope.holds, record)
            if self._renewer is None:
                self._start_renewer()
            if settle_expired:  # in the background: a reservation never waits on ledger lookups
                self._to_settle[scope.base] = key
                self._start_chores()
        return None

    def settle(self, reservation_id: str, budget: str, key: str, tokens: int, nano_usd: int) -> bool:
        with self._lock:  # forgotten first: a hold whose settle fails is left to expire
            self._open.pop(reservation_id, None)
            admitted = reservation_id in self._admitted
            self._admitted.discard(reservation_id)
        settle = _Settlement(admitted, reservation_id, budget, key, int(tokens), int(nano_usd))
        try:
            done = self._send(settle)
        except StoreUnavailable as error:
            self._unavailable(error, "settling")
            self._keep_unsent(settle)
            return False
        self._reachable()
        return done

    def _send(self, settle: _Settlement) -> bool:
        """Run ``settle``'s script: plain spend for a call admitted fail-open, else the
        settle of its hold. Both count once, however often they are sent."""
        scope, record = self._scope(settle.budget, settle.key), self._record(settle.reservation_id)
        if settle.admitted:
            args: list[str | int] = [settle.tokens, settle.nano_usd, self._expire_at_ms(settle.key),
                                     self._record_ttl_ms, settle.reservation_id, scope.base]
            return bool(self.redis.run(self._spend, scope.keys(record), args, "settling"))
        args = [settle.reservation_id, settle.tokens, settle.nano_usd, scope.base, self._expire_at_ms(settle.key)]
        return bool(self.redis.run(self._settle, scope.keys(record), args, "settling"))

    def release(self, reservation_id: str) -> bool:
        record = self._record(reservation_id)
        with self._lock:
            self._open.pop(reservation_id, None)
            if reservation_id in self._admitted:
                self._admitted.discard(reservation_id)
                return True
        try:
            with self.redis.errors("releasing"):
                base = self.redis.client.get(record)
            if base is None:
                return False
            reply = self.redis.run(self._release, _Scope(base).keys(record), [reservation_id, base], "releasing")
        except StoreUnavailable as error:
            self._unavailable(error, "releasing")
            return False
        self._reachable()
        return bool(reply)

    def usage(self, budget: str, key: str) -> tuple[int, int, int, int]:
        scope = self._scope(budget, key)
        t, u, rt, ru, waiting = (int(v) for v in self.redis.run(self._usage, scope.own, [], "reading usage"))
        self._reachable()
        if waiting and self._lookups:
            try:
                if self._settle_expired_holds(scope, key):
                    t, u, rt, ru, _ = (int(v) for v in self.redis.run(self._usage, scope.own, [], "reading usage"))
            except Exception:  # best effort: the totals read stand, the ids wait
                logger.warning("could not settle expired budget reservations on %s", self.redis.url.display,
                               exc_info=True)
        return t, u, rt, ru

    # -- dead processes' calls -----------------------------------------------------------

    def add_settled_lookup(self, lookup: SettledLookup, *, key: object = None) -> None:
        """Settle, rather than drop, an expired hold whose call has a ledger row:
        ``lookup`` (see :data:`~tokenguard.stores.base.SettledLookup`) finds what the
        call spent. One per ``key`` (default: the lookup itself), a later one replacing
        it; :func:`~tokenguard.accounting.budget.link_ledger` adds the guard's ledger."""
        self._lookups.add(lookup, key=key)

    def _settle_expired_holds(self, scope: _Scope, key: str, batch: int = 100) -> int:
        """Settle the expired holds waiting in ``scope`` from their calls' ledger rows
        (at most ``batch`` of them); how many counted. A hold whose lookup failed waits
        for a later try; one whose call has no row is dropped. A process with no ledger
        linked leaves them all to one that has one."""
        if not self._lookups:
            return 0
        with self.redis.errors("reading expired reservations"):
            waiting = self.redis.client.zrange(scope.expired, 0, batch - 1)
        counted = 0
        for reservation_id in waiting:
            spent = self._lookups.spent_by(reservation_id)
            if spent is SettledLookups.UNKNOWN:
                continue
            tokens, nano_usd = spent if isinstance(spent, tuple) else ("", "")
            args: list[str | int] = [reservation_id, scope.base, tokens, nano_usd, self._expire_at_ms(key)]
            counted += int(self.redis.run(self._settle_expired, scope.keys(self._record(reservation_id)), args,
                                          "settling an expired reservation"))
        return counted

    # -- background chores --------------------------------------------------------------

    def _start_chores(self) -> None:
        """Start the chores thread unless it runs (called with ``_lock`` held): it
        settles the queued scopes' expired holds, sends the settles Redis missed, and
        ends when nothing is left (or Redis fails it: the next answer starts it again)."""
        if self._chores is None:
            self._chores = threading.Thread(target=self._do_chores, daemon=True,
                                            name=f"tokenguard-redis-chores-{uuid.uuid4().hex[:6]}")
            self._chores.start()

    def _do_chores(self) -> None:
        """The chores thread's work: queued scopes first, then the settles to send; it
        stops at the first failure of each kind (Redis is likely down) and when done."""
        settled_ok = sent_ok = True
        while True:
            with self._lock:
                queued = self._to_settle.popitem() if settled_ok and self._to_settle else None
                if queued is None and not (sent_ok and self._unsent):
                    self._chores = None
                    return
            if queued is not None:
                base, key = queued
                settled_ok = self._settle_expired_quietly(_Scope(base), key)
            else:
                sent_ok = self._send_unsent()

    def _settle_expired_quietly(self, scope: _Scope, key: str) -> bool:
        """:meth:`_settle_expired_holds`, logging a failure (the ids wait for the next
        try) instead of raising; whether it ran."""
        try:
            self._settle_expired_holds(scope, key)
            return True
        except Exception:  # housekeeping in the background: the next reservation retries
            logger.warning("could not settle expired budget reservations on %s", self.redis.url.display,
                           exc_info=True)
            return False

    def _send_unsent(self) -> bool:
        """Send the settles Redis missed, oldest first, until none is left (``True``) or
        Redis cannot take one (kept for the next try; ``False``). One it refuses for
        another reason (a key of the wrong type) is dropped, with a warning."""
        while True:
            with self._lock:
                if not self._unsent:
                    self._overflowed = False
                    return True
                settle = self._unsent.popleft()
            try:
                self._send(settle)
            except StoreUnavailable:
                with self._lock:
                    self._unsent.appendleft(settle)
                return False
            except Exception:  # one bad settle must not block the others
                logger.warning("could not send the settle of budget reservation %s; it is not counted",
                               settle.reservation_id, exc_info=True)

    # -- renewal -----------------------------------------------------------------------

    def _start_renewer(self) -> None:
        """Start this process's renewal thread (called with ``_lock`` held)."""
        self._renewer = threading.Thread(
            target=_renew_loop,
            args=(weakref.ref(self), self._stop, self.reservation_ttl_s / 3),
            name=f"tokenguard-redis-renew-{uuid.uuid4().hex[:6]}",
            daemon=True,
        )
        self._renewer.start()

    def _renew_open_holds(self) -> None:
        """Extend every hold this process still has open, in one pipeline; stop
        renewing those that are gone or expired."""
        with self._lock:
            held = list(self._open.items())
        if not held:
            return
        try:
            with self.redis.errors("renewing reservations"):
                pipe = self.redis.client.pipeline(transaction=False)
                for reservation_id, (holds, record) in held:
                    self._renew(keys=[holds, record], args=[reservation_id, self._ttl_ms, self._record_ttl_ms],
                                client=pipe)
                replies = pipe.execute()
        except Exception as error:  # noqa: BLE001 - a background thread must not die; the next round retries
            logger.warning("could not renew budget reservations on %s: %s", self.redis.url.display, error)
            return
        lost = [rid for (rid, _), renewed in zip(held, replies, strict=True) if not renewed]
        if lost:
            with self._lock:
                for reservation_id in lost:
                    self._open.pop(reservation_id, None)

    def close(self) -> None:
        """Stop renewing (this process's open holds then expire after the TTL), send the
        settles Redis missed if it answers now (those it still misses are not counted),
        and close the connections; a later call opens them again."""
        with self._lock:
            self._stop.set()
            self._stop, self._renewer = threading.Event(), None
            self._open.clear()
        if self._unsent and not self._send_unsent():
            with self._lock:
                lost, self._unsent = len(self._unsent), deque()
            logger.warning("budget store %s closed with %d settles Redis missed: they are not counted",
                           self.redis.url.display, lost)
        self.redis.close()

    def __repr__(self) -> str:
        return f"RedisBudgetStore({self.redis.url.display!r}, prefix={self.prefix!r})"
