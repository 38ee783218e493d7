"""The deployment's queue gauges: how much work is waiting and where the builds run, from Redis.

One worker of the deployment computes them at a time (the holder of ``buildq:gauges:lease``, see
``lua/gauges.lua``) and leaves the snapshot in ``buildq:gauges``; every other worker reads that
snapshot. So however many workers serve ``/metrics``, the counting costs one bounded script every
few seconds per deployment, and a scrape costs no Redis round trip at all (the worker serves the
snapshot it last read). A holder that dies loses the lease after ``lease_s``; the next worker to
ask takes it over.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .jobs import JobStore
from .keys import (
    BAND,
    DOWN_LOAD,
    GAUGES,
    GAUGES_LEASE,
    JOB_PREFIX,
    JOBS_INDEX,
    WAITING_INDEX,
    WORKERS,
    load_key,
)

#: job hashes one walk reads at most (the queued band of the jobs index, the waiting index)
WALK_MAX = 2000


@dataclass(frozen=True)
class QueueGauges:
    """One snapshot (times are the Redis server's clock, epoch seconds)."""

    #: when it was computed, and by which worker
    at: float
    by: str
    #: messages waiting in each queue's list (``LLEN``)
    queues: Mapping[str, int]
    #: how long the oldest job that is due and still queued has waited (0: none)
    oldest_queued_s: float
    #: slots in use per daemon (a build holds one from its claim to its record)
    slots: Mapping[str, int]
    #: builds per daemon (``BUILDQ_BUILDKIT_MAX_BUILDS`` of the worker that computed it)
    limit: int
    #: live worker main processes (heartbeats)
    workers: int
    #: jobs put back to wait for a daemon (every daemon full or down)
    waiting_for_daemon: int

    @property
    def running(self) -> int:
        """Builds holding a daemon slot, over all daemons."""
        return sum(self.slots.values())

    @property
    def full(self) -> int:
        """Daemons whose every slot is in use."""
        return sum(1 for n in self.slots.values() if n >= self.limit)


def parse_snapshot(text: str | bytes) -> QueueGauges:
    """A snapshot from its JSON (as ``lua/gauges.lua`` writes it)."""
    raw: dict[str, Any] = json.loads(text)

    def counts(value: Any) -> dict[str, int]:  # cjson writes an empty table as {} (or [])
        return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}

    return QueueGauges(
        at=float(raw["at"]),
        by=str(raw["by"]),
        queues=counts(raw.get("queues")),
        oldest_queued_s=max(0.0, float(raw.get("oldest_queued_s") or 0.0)),
        slots=counts(raw.get("slots")),
        limit=int(raw["limit"]),
        workers=int(raw.get("workers") or 0),
        waiting_for_daemon=int(raw.get("waiting_for_daemon") or 0),
    )


@dataclass(frozen=True)
class GaugeRead:
    """What one call got: the snapshot (None: nobody has computed one yet), whether this worker
    computed it, and the server clock at the call (epoch s)."""

    snapshot: QueueGauges | None
    computed: bool
    now: float


def read_gauges(
    store: JobStore,
    *,
    worker: str,
    queue: str,
    high_queue: str,
    daemons: Sequence[str],
    limit: int,
    lease_s: float,
    keep_s: float = 60.0,
) -> GaugeRead:
    """Compute the gauges when this ``worker`` holds (or takes) the deployment's gauges lease, else
    read the snapshot the holder left (one round trip either way)."""
    computed, text, now_ms = store.scripts.call(
        "gauges", lease_key=GAUGES_LEASE, snapshot_key=GAUGES, jobs_index=JOBS_INDEX,
        waiting_index=WAITING_INDEX, workers=WORKERS, queue=queue, high_queue=high_queue,
        load_index=load_key(daemons), worker=worker, lease_ms=max(1, int(lease_s * 1000)),
        keep_ms=max(1, int(keep_s * 1000)), job_prefix=JOB_PREFIX, walk_max=WALK_MAX, limit=limit,
        band=BAND, down_load=DOWN_LOAD, daemons=list(dict.fromkeys(daemons)),
    )  # fmt: skip
    snapshot = parse_snapshot(text) if text else None
    return GaugeRead(snapshot, bool(computed), int(now_ms) / 1000)
