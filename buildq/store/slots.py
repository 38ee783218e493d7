"""Per-daemon capacity: a counting semaphore in Redis whose slots are leases.

Each BuildKit daemon has one sorted set (:func:`~buildq.store.keys.slot_key`): member = holder
token, score = the slot's expiry in milliseconds on the *Redis server's* clock (``TIME`` inside
Lua), so clock skew between workers cannot matter. Every script first drops expired members, so a
crashed worker's slot frees itself when its lease runs out; a live holder keeps its slot by calling
:meth:`DaemonSlots.renew` well within the TTL (e.g. every third of it).

All operations are one round trip (one ``EVALSHA``), including :meth:`DaemonSlots.acquire_any`
over many daemons. The slot sets given to one call are touched by one script, so on Redis Cluster
they must share a hash slot (not a concern on a single Redis). Each set also gets a key TTL a
little past its last expiry, so idle daemons leave no keys behind. The claim script
(:mod:`buildq.store.claim`) takes a slot with the same Lua function.

Requires Redis >= 5 (scripts that read ``TIME`` and then write are replicated by effects).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from .keys import DAEMONS_DOWN, SLOTS_PREFIX, slot_key
from .scripts import Scripts


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
    """Lease-based slots per daemon; one instance per process (scripts are registered once)."""

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    @staticmethod
    def key(daemon: str) -> str:
        return slot_key(daemon)

    def renew(self, daemon: str, token: str, ttl_s: float) -> bool:
        """Extend our slot to ``ttl_s`` from now; False if it expired (it may be someone else's now)."""
        return bool(self._scripts("renew_slot")(keys=[self.key(daemon)], args=[token, _ttl_ms(ttl_s)]))

    def acquire_any(
        self,
        daemons: Sequence[str],
        token: str,
        ttl_s: float,
        limit: int,
        *,
        prefer: int = 0,
        avoid: str | None = None,
    ) -> str | None:
        """Take a slot on the least loaded daemon that is up and has room, in one round trip; None if
        there is none (all full, or down: :class:`~buildq.store.daemons.DaemonHealth`).

        Among equally loaded daemons the first in the rotation starting at ``daemons[prefer % n]``
        wins, so callers passing different ``prefer`` values (attempt number, job hash) spread out.
        ``avoid`` is taken only when no other daemon has room. If ``token`` already holds a slot on
        one of them, that daemon is returned (lease extended).
        """
        order = rotate(daemons, prefer)
        if not order:
            return None
        args: list[str | int] = [token, _ttl_ms(ttl_s), _check_limit(limit), len(SLOTS_PREFIX), avoid or ""]
        keys = [DAEMONS_DOWN, *(self.key(d) for d in order)]
        index = int(self._scripts("acquire_any")(keys=keys, args=args))
        return order[index - 1] if index > 0 else None


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
    avoid: str | None = None,
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
        daemon = slots.acquire_any(daemons, token, ttl_s, limit, prefer=prefer, avoid=avoid)
        if daemon is not None:
            return daemon
        left = deadline - clock()
        if left <= 0:
            return None
        sleep(min(left, poll_s * (0.5 + jitter())))


def wait_for_slot_preferring(
    slots: DaemonSlots,
    daemons: Sequence[str],
    token: str,
    ttl_s: float,
    limit: int,
    *,
    preferred: str | None,
    affinity_wait_s: float,
    slot_wait_s: float = 5.0,
    prefer: int = 0,
    avoid: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> str | None:
    """A slot, waiting first for ``preferred`` alone (the daemon that has the job's cache, up but
    full) for at most ``affinity_wait_s``, then for any daemon (:func:`wait_for_slot`) for what is
    left of ``slot_wait_s``; None when all stayed full (the caller re-queues the job).

    Without ``preferred`` (or with no affinity wait) it is :func:`wait_for_slot` over ``daemons``.
    """
    started = clock()
    if preferred is not None and affinity_wait_s > 0:
        daemon = wait_for_slot(
            slots, [preferred], token, ttl_s, limit,
            max_wait_s=affinity_wait_s, clock=clock, sleep=sleep, jitter=jitter,
        )  # fmt: skip
        if daemon is not None:
            return daemon
    return wait_for_slot(
        slots, daemons, token, ttl_s, limit,
        max_wait_s=max(0.0, slot_wait_s - (clock() - started)), prefer=prefer, avoid=avoid,
        clock=clock, sleep=sleep, jitter=jitter,
    )  # fmt: skip
