"""Taking a job before its build starts, in one Redis round trip, and holding it while it runs.

:func:`claim` runs one Lua script (``lua/claim.lua``, atomic, one round trip): a stored result
ends it there (a duplicate delivery returns the record, touching nothing); otherwise it takes the job's lease
(``SET NX PX``), counts the claim (a non-zero earlier count means a dead worker may have left a
buildctl behind), drops the janitor's copy of the message, reads the cancel flag and takes a daemon
slot: on the daemon that last built with the job's cache when it is up and has room (cache
affinity, ``affinity:<cache key>``), else on the least loaded daemon under its cap. The rare paths
(lease held elsewhere, the remembered daemon or every daemon full) fall back to polling.
:class:`Holder` renews the lease and the slot and watches the cancel flag while buildctl runs.
:func:`finish` is the other end, also one script: the log's last
entries, the result record, the job's final state, the lease and slot given back, and the
"done" notice, all at once; for a build that succeeded also the daemon it ran on, remembered for
its cache, and its entry in its repository's baseline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .baseline import BASELINE_TTL_S, BaselineWrite
from .jobs import JobStore
from .keys import (
    DAEMONS_DOWN,
    QUEUED_INDEX,
    SLOTS_PREFIX,
    affinity_key,
    cancel_key,
    done_channel,
    job_key,
    lease_key,
    log_key,
    result_key,
)
from .logs import Entry, LogStore
from .slots import DaemonSlots, rotate

Clock = Callable[[], float]


@dataclass
class Claim:
    """What :func:`claim` found: a finished ``record``, or the lease (and maybe a daemon) is ours."""

    record: dict[str, Any] | None = None
    daemon: str | None = None
    cancelled: bool = False
    #: an earlier delivery took this job (a retry, or a worker that died: its buildctl may still run)
    claimed_before: bool = False
    #: the daemon that last built with the job's cache (None: none remembered, affinity off, or no
    #: longer one of ``daemons``)
    preferred: str | None = None
    #: ``preferred`` is up but full and the caller asked to wait for it: no slot was taken
    preferred_full: bool = False


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
    avoid: str | None = None,
    cache_key: str | None = None,
    affinity_wait: bool = False,
    clock: Clock = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Claim:
    """Take ``job_id``'s lease for ``token`` (waiting while another live delivery holds it).

    Returns the stored record of a finished job, or a Claim whose lease is held (the
    caller releases it); ``daemon`` is None when no daemon that is up had a free slot in that round
    trip (or the job is cancelled); ``avoid`` is taken only when no other daemon has room. Without
    ``slots`` the daemon is ``daemons[prefer % len(daemons)]``.

    With ``cache_key`` (cache affinity on) the daemon remembered for it is taken first while it is
    up, not ``avoid`` and has room; when it is full and ``affinity_wait`` is set, nothing is taken
    and ``preferred_full`` says so (the caller waits for it); otherwise the least loaded daemon.
    Raises TimeoutError when another delivery holds the lease for ``give_up_after_s``.
    """
    deadline = clock() + give_up_after_s
    order = rotate(daemons, prefer) if slots is not None else []
    keys = [result_key(job_id), lease_key(job_id), job_key(job_id), QUEUED_INDEX, cancel_key(job_id)]
    keys.append(affinity_key(cache_key) if cache_key is not None and slots is not None else "")
    keys += [DAEMONS_DOWN, *(slots.key(d) for d in order)] if slots is not None else [DAEMONS_DOWN]
    args = [job_id, token, max(1, int(ttl_s * 1000)), limit, len(SLOTS_PREFIX), avoid or ""]
    args += [1 if affinity_wait else 0, store.result_ttl_s]
    while True:  # the lease reaches the replicas before buildctl starts: a failover keeps it
        reply = store.scripts.durable("claim", keys=keys, args=args, what=f"claim of job {job_id}")
        if reply[0] == 0:
            return Claim(record=dict(json.loads(reply[1])))
        if reply[0] == 2:
            _, earlier, cancelled, position, remembered, full = reply
            if slots is None:
                daemon: str | None = daemons[prefer % len(daemons)] if not cancelled else None
            else:
                daemon = order[position - 1] if position else None
            preferred = order[remembered - 1] if remembered else None
            return Claim(
                daemon=daemon,
                cancelled=bool(cancelled),
                claimed_before=earlier > 0,
                preferred=preferred,
                preferred_full=bool(full),
            )
        if clock() > deadline:
            raise TimeoutError(f"job {job_id} is held by another worker for too long")
        sleep(poll_s)


def release(store: JobStore, slots: DaemonSlots | None, job_id: str, token: str, daemon: str | None) -> None:
    """Give back the slot and the lease (the lease only while still ours) in one round trip."""
    pipe = store.redis.pipeline(transaction=False)
    if slots is not None and daemon is not None:
        pipe.zrem(slots.key(daemon), token)
    store.queue_release_lease(pipe, job_id, token)
    pipe.execute()


def finish(
    store: JobStore,
    slots: DaemonSlots | None,
    job_id: str,
    token: str,
    daemon: str | None,
    record: dict[str, Any],
    *,
    logs: LogStore | None = None,
    log_entries: Sequence[Entry] = (),
    remember: str | None = None,
    remember_ttl_s: int | None = None,
    baseline: BaselineWrite | None = None,
) -> bool:
    """Store the final ``record`` and end the claim, atomically, in one round trip; False (nothing
    written) when the lease is another delivery's, or expired and the job already has a result.

    Appends ``log_entries`` to the job's log stream (capped and expiring as ``logs`` says), stores
    the record and the job's final state, gives back the daemon slot and the lease (only while
    still ours), adds ``baseline``'s entry to its repository's baseline, and publishes the state
    on the job's "done" channel. A reader who sees the record therefore also sees the whole log and
    the lease gone. With ``remember`` (a cache key) and a record that ``succeeded`` on ``daemon``,
    that daemon is remembered for the key for ``remember_ttl_s`` (default: the result TTL), so the
    next build with that cache goes there.
    """
    slot_key = slots.key(daemon) if slots is not None and daemon is not None else ""
    keys = [result_key(job_id), job_key(job_id), log_key(job_id), lease_key(job_id), slot_key, QUEUED_INDEX]
    state = record["state"]
    remembered = daemon if remember is not None and daemon and state == "succeeded" else ""
    keys.append(affinity_key(remember) if remember is not None and remembered else "")
    keys.append(baseline.key if baseline is not None else "")
    args: list[Any] = [
        json.dumps(record, separators=(",", ":")),
        state,
        store.result_ttl_s,
        done_channel(job_id),
        token,
        1 if slot_key else 0,
        logs.maxlen if logs is not None else 0,
        logs.ttl_s if logs is not None else 0,
        job_id,
        remembered,
        remember_ttl_s or store.result_ttl_s,
        baseline.entry if baseline is not None else "",
        baseline.n if baseline is not None else 0,
        BASELINE_TTL_S,
    ]
    if logs is not None:
        for attempt, kind, line in log_entries:
            args += [attempt, kind, line.encode("utf-8", errors="replace")]
    return bool(store.scripts.durable("finish", keys=keys, args=args, what=f"result of job {job_id}"))


class Holder:
    """``should_stop`` for the runner (on the ticker thread): cancel flag, lease and slot renewal."""

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
