"""Re-sending submitted builds whose message the broker lost before any worker took it.

Celery's Redis transport moves a message from the queue list to its ``unacked`` hash in two
steps (``BRPOP``, then ``HSET``); a Redis restart between them loses the message. The client
therefore keeps each message it sends in the job's hash and indexes the job in
``buildq:queued`` until a worker claims it. :func:`requeue_lost` (run periodically by every worker)
pushes the message back for a job that is still ``queued`` after ``after_s``, was never claimed,
has no result, and whose message is neither in its queue nor unacknowledged. One Lua script per
job makes the check-and-push atomic, so several workers never push the same message twice; and a
spurious push could only lead to a duplicate delivery, which the job lease turns into a no-op.

:func:`requeue_stalled` does the same for messages a worker took and can no longer finish or
hand back (its process was terminated while Redis was unreachable): still unacknowledged, no
live job lease, no result. Celery would restore them only after the visibility timeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from ..names import TASK_NAME
from .jobs import JobStore
from .keys import QUEUED_INDEX, UNACKED_INDEX_KEY, UNACKED_KEY, job_key, lease_key, result_key

log = logging.getLogger("buildq.janitor")


def requeue_lost(store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200) -> list[str]:
    """Push back the messages of jobs lost before pickup; return their job ids."""
    script = store.scripts("requeue_lost")
    cutoff = (time.time() if now is None else now) - after_s
    requeued = []
    for raw in store.redis.zrangebyscore(QUEUED_INDEX, "-inf", cutoff, start=0, num=batch):
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        keys = [job_key(job_id), result_key(job_id), lease_key(job_id), QUEUED_INDEX, UNACKED_KEY]
        if script(keys=keys, args=[job_id]):
            requeued.append(job_id)
    if requeued:
        log.warning("re-sent %d build message(s) the broker lost: %s", len(requeued), ", ".join(requeued))
    return requeued


def requeue_stalled(
    store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200
) -> list[str]:
    """Put back delivered build messages whose worker is gone; return their job ids.

    A message delivered more than ``after_s`` ago that is still unacknowledged while its job has
    no live lease and no result belongs to a worker that stopped (killed, or cut off from Redis
    when Celery tried to hand it back). Celery's own restore waits for the visibility timeout
    (hours); the job lease is a better heartbeat. Retry messages waiting for their ETA are left alone.
    """
    script = store.scripts("restore_stalled")
    clock = time.time() if now is None else now
    requeued = []
    for raw_tag in store.redis.zrangebyscore(UNACKED_INDEX_KEY, "-inf", clock - after_s, start=0, num=batch):
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
        payload = store.redis.hget(UNACKED_KEY, tag)
        job = _build_message_job(payload, clock)
        if job is None:
            continue
        job_id, queue = job
        keys = [UNACKED_KEY, UNACKED_INDEX_KEY, lease_key(job_id), result_key(job_id), job_key(job_id)]
        if script(keys=keys, args=[tag, queue]):
            requeued.append(job_id)
    if requeued:
        log.warning("re-queued %d build(s) whose worker went away: %s", len(requeued), ", ".join(requeued))
    return requeued


def _build_message_job(payload: object, now: float) -> tuple[str, str] | None:
    """(job id, queue) of an unacked ``buildq.build`` message that is due; None otherwise."""
    if not isinstance(payload, bytes | str):
        return None
    try:
        message, _exchange, routing_key = json.loads(payload)
        headers = message.get("headers") or {}
        if headers.get("task") != TASK_NAME or not headers.get("id") or not routing_key:
            return None
        eta = headers.get("eta")
        if eta and datetime.fromisoformat(eta).timestamp() > now:
            return None  # a retry waiting out its backoff in a live worker
        return str(headers["id"]), str(routing_key)
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


def start_janitor(store: JobStore, *, after_s: float, every_s: float) -> Callable[[], None]:
    """Run :func:`requeue_lost` every ``every_s`` seconds in a daemon thread; returns ``stop``."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                requeue_lost(store, after_s=after_s)
                requeue_stalled(store, after_s=after_s)
            except Exception as exc:  # noqa: BLE001 - Redis may be down; try again next round
                log.info("lost-message check skipped: %s", exc)

    threading.Thread(target=loop, name="buildq-janitor", daemon=True).start()
    return stop.set
