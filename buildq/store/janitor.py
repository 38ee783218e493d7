"""Re-sending builds whose message the broker lost.

Celery's Redis transport moves a message from the queue list to its ``unacked`` hash in two
steps (``BRPOP``, then ``HSET``); a Redis restart between them (or writes a restart did not keep)
loses the message. The client therefore keeps each message it sends in the job's hash and indexes
the job in ``buildq:queued``; a retry or a wait for a daemon replaces that copy with the message it
publishes, and only the job's finish drops it. :func:`requeue_lost` (run periodically by every
worker) pushes the message back for a job older than ``after_s`` that has no result, no live
lease, and whose message is neither in its queue nor unacknowledged. One Lua script per job makes
the check-and-push atomic, so several workers never push the same message twice; and a spurious
push could only lead to a duplicate delivery, which the job lease turns into a no-op.

:func:`requeue_stalled` does the same for messages a worker took and can no longer finish or
hand back (its process was terminated while Redis was unreachable): still unacknowledged, no
live job lease, no result. Celery would restore them only after the visibility timeout.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from ..names import TASK_NAME
from .jobs import JobStore
from .keys import QUEUED_INDEX, UNACKED_INDEX_KEY, UNACKED_KEY, WORKERS, job_keys

log = logging.getLogger("buildq.janitor")


def server_time(store: JobStore) -> float:
    """The Redis server's clock (epoch seconds): the one clock every worker and producer shares."""
    sec, usec = store.redis.time()
    return sec + usec / 1e6


def requeue_lost(store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200) -> list[str]:
    """Push back the messages the broker lost among the ``batch`` oldest jobs; return their ids."""
    return _requeue_lost(store, after_s, server_time(store) if now is None else now, batch, 0)[0]


def _requeue_lost(
    store: JobStore, after_s: float, now: float, batch: int, offset: int
) -> tuple[list[str], int]:
    """One slice of the index from ``offset``: (job ids pushed back, where the next slice starts)."""
    requeued, kept = [], 0
    entries = store.redis.zrangebyscore(QUEUED_INDEX, "-inf", now - after_s, start=offset, num=batch)
    for raw in entries:
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        k = job_keys(job_id)
        pushed = store.scripts.call(
            "requeue_lost", job_hash=k.hash, result_key=k.result, lease_key=k.lease,
            queued_index=QUEUED_INDEX, unacked=UNACKED_KEY, job_id=job_id,
        )  # fmt: skip
        if pushed:
            requeued.append(job_id)
        if store.redis.zscore(QUEUED_INDEX, job_id) is not None:
            kept += 1
    if requeued:
        log.warning("re-sent %d build message(s) the broker lost: %s", len(requeued), ", ".join(requeued))
    return requeued, (offset + kept if len(entries) == batch else 0)


def requeue_stalled(
    store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200, offset: int = 0
) -> list[str]:
    """Put back delivered build messages whose worker is gone; return their job ids.

    A message delivered more than ``after_s`` ago that is still unacknowledged while its job has
    no live lease and no result belongs to a worker that stopped (killed, or cut off from Redis
    when Celery tried to hand it back). Celery's own restore waits for the visibility timeout
    (hours); the job lease is a better heartbeat. A retry waiting out its backoff (an ETA message)
    is put back once the worker holding it has no heartbeat (or, when nobody said who holds it,
    once its ETA is ``after_s`` past).
    """
    clock = server_time(store) if now is None else now
    requeued = []
    for raw_tag in store.redis.zrangebyscore(
        UNACKED_INDEX_KEY, "-inf", clock - after_s, start=offset, num=batch
    ):
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
        payload = store.redis.hget(UNACKED_KEY, tag)
        job = _build_message_job(payload)
        if job is None:
            continue
        job_id, queue, eta = job
        k = job_keys(job_id)
        restored = store.scripts.call(
            "restore_stalled", unacked=UNACKED_KEY, unacked_index=UNACKED_INDEX_KEY, lease_key=k.lease,
            result_key=k.result, job_hash=k.hash, workers=WORKERS, tag=tag, queue=queue,
            eta_ms=int(eta * 1000) if eta else 0, grace_ms=int(after_s * 1000),
        )  # fmt: skip
        if restored:
            requeued.append(job_id)
    if requeued:
        log.warning("re-queued %d build(s) whose worker went away: %s", len(requeued), ", ".join(requeued))
    return requeued


def _build_message_job(payload: object) -> tuple[str, str, float | None] | None:
    """(job id, queue, ETA epoch s or None) of an unacked ``buildq.build`` message; None otherwise."""
    if not isinstance(payload, bytes | str):
        return None
    try:
        message, _exchange, routing_key = json.loads(payload)
        headers = message.get("headers") or {}
        if headers.get("task") != TASK_NAME or not headers.get("id") or not routing_key:
            return None
        eta = headers.get("eta")
        return str(headers["id"]), str(routing_key), datetime.fromisoformat(eta).timestamp() if eta else None
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


class Janitor:
    """Runs both checks over the whole backlog, a slice of ``batch`` entries per run, so a big
    backlog is walked in turn instead of its oldest entries being read again and again."""

    def __init__(self, store: JobStore, *, after_s: float, batch: int = 200) -> None:
        self.store, self.after_s, self.batch = store, after_s, batch
        self._lost_offset = 0
        self._stalled_offset = 0

    def run_once(self, now: float | None = None) -> list[str]:
        """One slice of each check; the job ids put back."""
        clock = server_time(self.store) if now is None else now
        lost, self._lost_offset = _requeue_lost(
            self.store, self.after_s, clock, self.batch, self._lost_offset
        )
        tags = self.store.redis.zcount(UNACKED_INDEX_KEY, "-inf", clock - self.after_s)
        if self._stalled_offset >= tags:
            self._stalled_offset = 0
        stalled = requeue_stalled(
            self.store, after_s=self.after_s, now=clock, batch=self.batch, offset=self._stalled_offset
        )
        self._stalled_offset += self.batch
        return lost + stalled
