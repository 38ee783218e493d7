"""Taking a job before its build starts, in one Redis round trip, and holding it while it runs.

:func:`claim` runs one Lua script (atomic, one round trip): a stored result ends it there (a
duplicate delivery returns the record, touching nothing); otherwise it takes the job's lease
(``SET NX PX``), counts the claim (a non-zero earlier count means a dead worker may have left a
buildctl behind), drops the janitor's copy of the message, reads the cancel flag and takes a daemon
slot (the least loaded daemon under its cap). The rare paths (lease held elsewhere, every daemon
full) fall back to polling. :class:`Holder` renews the lease and the slot and watches the cancel
flag while buildctl runs; :func:`queue_release` gives both back, queued on the pipeline that stores
the result so that costs no round trip of its own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .capacity import ACQUIRE_ANY_LUA, PRELUDE_LUA, DaemonSlots, rotate
from .state import QUEUED_INDEX, JobStore, cancel_key, job_key, lease_key, result_key

Clock = Callable[[], float]

# KEYS result, lease, job hash, queued index, cancel flag, slot sets (preference order, maybe none)
# ARGV job id, token, lease ttl ms, slot limit
# -> {0, record} finished | {1} lease held elsewhere | {2, earlier claims, cancelled, slot position}
_CLAIM = (
    PRELUDE_LUA
    + ACQUIRE_ANY_LUA
    + """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {1} end
local earlier = redis.call('HINCRBY', KEYS[3], 'claims', 1) - 1
redis.call('HDEL', KEYS[3], 'msg')
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then return {2, earlier, 1, 0} end
return {2, earlier, 0, acquire_any(6, ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))}
"""
)


@dataclass
class Claim:
    """What :func:`claim` found: a finished ``record``, or the lease (and maybe a daemon) is ours."""

    record: dict[str, Any] | None = None
    daemon: str | None = None
    cancelled: bool = False
    #: an earlier delivery took this job (a retry, or a worker that died: its buildctl may still run)
    claimed_before: bool = False


def claim(
    store: JobStore,
    slots: DaemonSlots | None,
    job_id: str,
    token: str,
    *,
    daemons: Sequence[str],
    limit: int,
    ttl_s: float,
    prefer: int,
    give_up_after_s: float,
    poll_s: float = 0.5,
    clock: Clock = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Claim:
    """Take ``job_id``'s lease for ``token`` (waiting while another live delivery holds it).

    Returns the stored record of a finished job, or a Claim whose lease is held (the
    caller releases it); ``daemon`` is None when no daemon had a free slot in that round trip (or
    the job is cancelled). Without ``slots`` the daemon is ``daemons[prefer % len(daemons)]``.
    Raises TimeoutError when another delivery holds the lease for ``give_up_after_s``.
    """
    deadline = clock() + give_up_after_s
    order = rotate(daemons, prefer) if slots is not None else []
    keys = [result_key(job_id), lease_key(job_id), job_key(job_id), QUEUED_INDEX, cancel_key(job_id)]
    keys += [slots.key(d) for d in order] if slots is not None else []
    args = [job_id, token, max(1, int(ttl_s * 1000)), limit]
    script = store.script(_CLAIM)
    while True:
        reply = script(keys=keys, args=args)
        if reply[0] == 0:
            return Claim(record=dict(json.loads(reply[1])))
        if reply[0] == 2:
            _, earlier, cancelled, position = reply
            if slots is None:
                daemon: str | None = daemons[prefer % len(daemons)] if not cancelled else None
            else:
                daemon = order[position - 1] if position else None
            return Claim(daemon=daemon, cancelled=bool(cancelled), claimed_before=earlier > 0)
        if clock() > deadline:
            raise TimeoutError(f"job {job_id} is held by another worker for too long")
        sleep(poll_s)


def queue_release(
    pipe: Any, store: JobStore, slots: DaemonSlots | None, job_id: str, token: str, daemon: str | None
) -> None:
    """Queue on ``pipe`` giving back the slot and the lease (the lease only while still ours)."""
    if slots is not None and daemon is not None:
        pipe.zrem(slots.key(daemon), token)
    store.queue_release_lease(pipe, job_id, token)


def release(store: JobStore, slots: DaemonSlots | None, job_id: str, token: str, daemon: str | None) -> None:
    """Give back the slot and the lease in one round trip."""
    pipe = store.redis.pipeline(transaction=False)
    queue_release(pipe, store, slots, job_id, token, daemon)
    pipe.execute()


class Holder:
    """``should_stop`` for the runner (watcher thread): cancel flag, lease and slot renewal."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: str,
        ttl_s: float,
        clock: Clock,
        slots: DaemonSlots | None = None,
        daemon: str | None = None,
    ) -> None:
        self.store, self.job_id, self.token, self.ttl, self.clock = store, job_id, token, ttl_s, clock
        self.slots, self.daemon = slots, daemon
        self.next_renewal = clock() + ttl_s / 3
        self.lock = threading.Lock()

    def __call__(self) -> str | None:
        with self.lock:
            try:
                if self.store.cancel_requested(self.job_id):
                    return "cancelled"
                if self.clock() >= self.next_renewal:
                    if not self.store.renew_lease(self.job_id, self.token, self.ttl):
                        return "lease_lost"
                    if self.slots is not None and self.daemon is not None:
                        self.slots.renew(self.daemon, self.token, self.ttl)
                    self.next_renewal = self.clock() + self.ttl / 3
            except Exception:  # noqa: BLE001 - Redis blip: keep building, try again next tick
                return None
            return None
