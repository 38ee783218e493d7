"""Taking a job before its build starts, in one Redis round trip, and holding it while it runs.

:func:`claim` sends one pipeline: the stored result (a duplicate delivery returns it), the job's
lease (``SET NX PX``), whether an earlier delivery claimed it (a dead worker may have left a buildctl
behind), the cancel flag, and a daemon slot (the least loaded daemon under its cap). The rare
paths (lease held elsewhere, every daemon full) fall back to polling. :class:`Holder` renews the
lease and the slot and watches the cancel flag while buildctl runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .capacity import DaemonSlots
from .state import QUEUED_INDEX, JobStore, cancel_key, job_key, lease_key, result_key

Clock = Callable[[], float]


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

    Returns the stored record of a finished job, or a Claim whose lease is held (the caller
    releases it); ``daemon`` is None when no daemon had a free slot in that round trip.
    Raises TimeoutError when another delivery holds the lease for ``give_up_after_s``.
    """
    deadline = clock() + give_up_after_s
    px = max(1, int(ttl_s * 1000))
    while True:
        pipe = store.redis.pipeline(transaction=False)
        pipe.get(result_key(job_id))
        pipe.set(lease_key(job_id), token, nx=True, px=px)
        pipe.hget(job_key(job_id), "claims")
        pipe.hincrby(job_key(job_id), "claims", 1)
        pipe.hdel(job_key(job_id), "msg")  # delivered: the janitor's copy is no longer needed
        pipe.zrem(QUEUED_INDEX, job_id)
        pipe.exists(cancel_key(job_id))
        decode = slots.queue_acquire_any(pipe, daemons, token, ttl_s, limit, prefer=prefer) if slots else None
        replies = pipe.execute()
        existing, acquired, previous, _, _, _, cancelled = replies[:7]
        daemon = decode(replies[7]) if decode is not None else daemons[prefer % len(daemons)]
        if existing or not acquired or cancelled:
            if slots is not None and daemon is not None:
                slots.release(daemon, token)
            daemon = None
        if existing:
            if acquired:
                store.release_lease(job_id, token)
            return Claim(record=dict(json.loads(existing)))
        if acquired:
            return Claim(daemon=daemon, cancelled=bool(cancelled), claimed_before=bool(previous))
        if clock() > deadline:
            raise TimeoutError(f"job {job_id} is held by another worker for too long")
        sleep(poll_s)


def release(store: JobStore, slots: DaemonSlots | None, job_id: str, token: str, daemon: str | None) -> None:
    """Give back the slot and the lease in one round trip."""
    pipe = store.redis.pipeline(transaction=False)
    if slots is not None and daemon is not None:
        pipe.zrem(slots.key(daemon), token)
    store.queue_release_lease(pipe, job_id, token)
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
