"""Per-daemon capacity: a counting semaphore in Redis whose slots are leases.

Each BuildKit daemon has one sorted set ``buildq:slots:<daemon>``: member = holder token, score = the
slot's expiry in milliseconds on the *Redis server's* clock (``TIME`` inside Lua), so clock skew
between workers cannot matter. Every script first drops expired members, so a crashed worker's slot
frees itself when its lease runs out; a live holder keeps its slot by calling :meth:`DaemonSlots.renew`
well within the TTL (e.g. every third of it).

All operations are one round trip (one ``EVALSHA`` or one ``ZREM``), including :meth:`acquire_any`
over many daemons. The slot sets of the daemons given to one :meth:`acquire_any` call are touched
by one script, so on Redis Cluster they must share a hash slot (not a concern on a single Redis).
Each set also gets a key TTL a little past its last expiry, so idle daemons leave no keys behind.

Requires Redis >= 5 (scripts that read ``TIME`` and then write are replicated by effects).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import redis

PREFIX = "buildq:slots:"

# now in ms on the server clock (`now`), and keep(key): set the key TTL to outlive its last member by a second
PRELUDE_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIRE', key, math.max(1, tonumber(top[2]) - now + 1000)) end
end
"""

# KEYS[1] slot set; ARGV token, ttl_ms, limit -> 1 granted (or already held, then extended) | 0
_TRY_ACQUIRE = (
    PRELUDE_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  keep(KEYS[1])
  return 1
end
return 0
"""
)

# KEYS[1] slot set; ARGV token, ttl_ms -> 1 extended | 0 lost (expired or never held)
_RENEW = (
    PRELUDE_LUA
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
keep(KEYS[1])
return 1
"""
)

# A Lua function (needs PRELUDE_LUA's ``now`` and ``keep``): take a slot for ``token`` on one of the
# slot sets KEYS[first..#KEYS] (preference order); returns its 1-based position among them, 0 if all
# are full. A set where the token already holds a slot wins (retry after a lost reply); otherwise
# the least loaded one with room, the earliest among equals. Shared by acquire_any and claim.
ACQUIRE_ANY_LUA = """
local function acquire_any(first, token, ttl_ms, limit)
  local best, best_n = 0, limit
  for i = first, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('ZSCORE', KEYS[i], token) then
      best = i
      break
    end
    local n = redis.call('ZCARD', KEYS[i])
    if n < best_n then best, best_n = i, n end
  end
  if best == 0 then return 0 end
  redis.call('ZADD', KEYS[best], now + ttl_ms, token)
  keep(KEYS[best])
  return best - first + 1
end
"""

# KEYS slot sets in preference order; ARGV token, ttl_ms, limit -> 1-based index granted | 0 all full.
_ACQUIRE_ANY = (
    PRELUDE_LUA + ACQUIRE_ANY_LUA + "return acquire_any(1, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))\n"
)

# KEYS slot sets -> live member count of each (read only)
_USAGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('ZCOUNT', key, '(' .. now, '+inf') end
return out
"""


def slot_key(daemon: str, prefix: str = PREFIX) -> str:
    """The sorted set holding ``daemon``'s slots."""
    return prefix + daemon


def _ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def _check_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")
    return int(limit)


def rotate(daemons: Sequence[str], prefer: int) -> list[str]:
    """``daemons`` without duplicates, starting at index ``prefer`` (modulo their number)."""
    unique = list(dict.fromkeys(daemons))
    if not unique:
        return []
    start = prefer % len(unique)
    return unique[start:] + unique[:start]


class DaemonSlots:
    """Lease-based slots per daemon; one instance per process (scripts are registered once).

    ``limit`` is only the default for :meth:`usage`; acquiring takes the limit explicitly.
    """

    def __init__(self, client: redis.Redis, *, limit: int = 4, prefix: str = PREFIX) -> None:
        self.redis = client
        self.limit = _check_limit(limit)
        self.prefix = prefix
        self._try_acquire = client.register_script(_TRY_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._acquire_any = client.register_script(_ACQUIRE_ANY)
        self._usage = client.register_script(_USAGE)

    @classmethod
    def from_url(cls, url: str, *, limit: int = 4) -> DaemonSlots:
        return cls(redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30), limit=limit)

    def key(self, daemon: str) -> str:
        return slot_key(daemon, self.prefix)

    def try_acquire(self, daemon: str, token: str, ttl_s: float, limit: int) -> bool:
        """Take a slot on ``daemon`` for ``ttl_s`` unless ``limit`` live holders have one.

        True also when ``token`` already holds a slot there (its lease is then extended).
        """
        args: list[str | int] = [token, _ttl_ms(ttl_s), _check_limit(limit)]
        return bool(self._try_acquire(keys=[self.key(daemon)], args=args))

    def renew(self, daemon: str, token: str, ttl_s: float) -> bool:
        """Extend our slot to ``ttl_s`` from now; False if it expired (it may be someone else's now)."""
        return bool(self._renew(keys=[self.key(daemon)], args=[token, _ttl_ms(ttl_s)]))

    def release(self, daemon: str, token: str) -> bool:
        """Give the slot back; False if ``token`` held none there (already expired or released)."""
        return bool(self.redis.zrem(self.key(daemon), token))

    def acquire_any(
        self, daemons: Sequence[str], token: str, ttl_s: float, limit: int, *, prefer: int = 0
    ) -> str | None:
        """Take a slot on the least loaded daemon with room, in one round trip; None if all are full.

        Among equally loaded daemons the first in the rotation starting at ``daemons[prefer % n]``
        wins, so callers passing different ``prefer`` values (attempt number, job hash) spread out.
        If ``token`` already holds a slot on one of them, that daemon is returned (lease extended).
        """
        order = rotate(daemons, prefer)
        if not order:
            return None
        args: list[str | int] = [token, _ttl_ms(ttl_s), _check_limit(limit)]
        index = int(self._acquire_any(keys=[self.key(d) for d in order], args=args))
        return order[index - 1] if index > 0 else None

    def usage(self, daemons: Sequence[str], limit: int | None = None) -> dict[str, tuple[int, int]]:
        """``{daemon: (live holders, limit)}`` in one round trip; expired holders are not counted."""
        order = list(dict.fromkeys(daemons))
        if not order:
            return {}
        cap = self.limit if limit is None else _check_limit(limit)
        counts = self._usage(keys=[self.key(d) for d in order])
        return {daemon: (int(n), cap) for daemon, n in zip(order, counts, strict=True)}


def wait_for_slot(
    slots: DaemonSlots,
    daemons: Sequence[str],
    token: str,
    ttl_s: float,
    limit: int,
    *,
    max_wait_s: float = 5.0,
    poll_s: float = 0.2,
    prefer: int = 0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> str | None:
    """Poll :meth:`DaemonSlots.acquire_any` for up to ``max_wait_s``; the daemon granted, or None.

    Tries once immediately, then sleeps ``poll_s × (0.5 + jitter())`` (jitter in [0, 1): 0.5–1.5 ×
    ``poll_s``, never past the deadline) between tries, so waiting workers do not poll in lockstep.
    None means "all daemons stayed full": the caller should re-queue the job rather than hold a
    worker slot while waiting.
    """
    deadline = clock() + max_wait_s
    while True:
        daemon = slots.acquire_any(daemons, token, ttl_s, limit, prefer=prefer)
        if daemon is not None:
            return daemon
        left = deadline - clock()
        if left <= 0:
            return None
        sleep(min(left, poll_s * (0.5 + jitter())))
