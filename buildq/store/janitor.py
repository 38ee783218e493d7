"""The janitor: one worker per deployment brings back the builds the broker or a dead worker lost.

It runs on the main process of whichever worker holds the deployment's janitor lease (``buildq:
janitor``, renewed at each pass), so its cost does not grow with the number of workers; each pass
does a bounded amount of work (``batch`` jobs per check), whatever the backlog, and each job costs
O(1) Redis work. A pass:

1. **Lost messages.** Celery's Redis transport moves a message from the queue list to its
   ``unacked`` hash in two steps (``BRPOP``, then ``HSET``); a Redis restart between them (or
   writes a restart did not keep) loses it. A queued job (the index's queued band) older
   than ``after_s`` whose message is neither in its queue nor unacknowledged, and that has no live
   lease and no record, is pushed back (``lua/lost.lua`` finds them without searching the queue:
   see ``lua/queue_fn.lua`` on ``pushed_at``; ``lua/push_lost.lua`` pushes the message, made again
   from the job). A spurious push could only lead to a duplicate delivery, which the claim drops.
2. **Stalled messages.** Delivered messages whose worker is gone (killed, or cut off from Redis
   when Celery tried to hand them back): still unacknowledged while their job has no live lease and
   no record (``lua/restore_stalled.lua``). Celery would restore them only after the visibility
   timeout.
3. **Slots of dead claims.** A claim whose lease ran out (its holder died) still counts on its
   daemon until a takeover claims the job; past a grace period its slot is given back
   (``lua/expired_slots.lua``).
4. **Housekeeping.** The index's final bands are trimmed (to :data:`RECENT_MAX` ids and the result
   TTL), and every tenth pass the load index of the worker's daemons is checked against
   the breakers (``lua/register_load.lua``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..contract.wire import build_message
from ..names import TASK_NAME
from .jobs import JobStore
from .keys import (
    FINAL_STATES,
    JANITOR_LEASE,
    JOB_PREFIX,
    JOBS_INDEX,
    QUEUES,
    RECENT_MAX,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    WORKERS,
    job_key,
    state_band,
)

log = logging.getLogger("buildq.janitor")

#: how much older than the queue's head a message must be to count as gone from the queue
HEAD_MARGIN_S = 5.0


def server_time(store: JobStore) -> float:
    """The Redis server's clock (epoch seconds): the one clock every worker and producer shares."""
    sec, usec = store.redis.time()
    return sec + usec / 1e6


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def requeue_lost(store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200) -> list[str]:
    """Push back the messages the broker lost among the ``batch`` oldest queued jobs; their ids."""
    return _requeue_lost(store, (server_time(store) if now is None else now) - after_s, batch, 0)[0]


def _requeue_lost(store: JobStore, upto: float, batch: int, offset: int) -> tuple[list[str], int]:
    """One slice, from ``offset``, of the queued jobs enqueued before ``upto`` (epoch s): (job ids
    pushed back, where the next slice starts)."""
    r = store.redis
    low, high = state_band("queued")
    top = min(upto, high - 1)
    entries = [_text(v) for v in r.zrangebyscore(JOBS_INDEX, low, top, start=offset, num=batch)]
    if not entries:
        return [], 0
    found = store.scripts.call(
        "lost", unacked=UNACKED_KEY, jobs_index=JOBS_INDEX, job_hashes=[job_key(j) for j in entries],
        margin_ms=int(HEAD_MARGIN_S * 1000), job_prefix=JOB_PREFIX, job_ids=entries,
    )  # fmt: skip
    requeued = []
    for job_id, stamp in zip(found[::2], found[1::2], strict=True):
        job_id = _text(job_id)
        if _push_back(store, job_id, _text(stamp)):
            requeued.append(job_id)
    if requeued:
        log.warning("re-sent %d build message(s) the broker lost: %s", len(requeued), ", ".join(requeued))
    return requeued, (offset + len(entries) if len(entries) == batch else 0)


def _push_back(store: JobStore, job_id: str, stamp: str) -> bool:
    """Make the job's current message again from its hash and push it to its queue's head."""
    fields = store.redis.hmget(job_key(job_id), ["job", "queue", "delivery", "tag", "attempts"])
    body, queue, delivery, tag, attempts = (_text(v) if v is not None else None for v in fields)
    if not (body and queue and delivery and tag):
        return False
    try:
        job = json.loads(body)
        retries = len(json.loads(attempts)) if attempts else 0
    except ValueError:
        return False
    message = build_message(job_id, queue, job, delivery=delivery, delivery_tag=tag, retries=retries)
    return bool(
        store.scripts.call(
            "push_lost", job_hash=job_key(job_id), unacked=UNACKED_KEY, queue=queue, message=message,
            delivery=delivery, pushed_at=stamp, job_prefix=JOB_PREFIX,
        )
    )  # fmt: skip


def requeue_stalled(
    store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200, offset: int = 0
) -> list[str]:
    """Put back delivered build messages whose worker is gone; their job ids.

    A message delivered more than ``after_s`` ago that is still unacknowledged while its job has
    no live lease and no record belongs to a worker that stopped. A retry waiting out its backoff
    (an ETA message) is put back once the worker holding it has no heartbeat (or, when nobody said
    who holds it, once its ETA is ``after_s`` past).
    """
    clock = server_time(store) if now is None else now
    tags = [_text(t) for t in store.redis.zrangebyscore(
        UNACKED_INDEX_KEY, "-inf", clock - after_s, start=offset, num=batch)]  # fmt: skip
    if not tags:
        return []
    payloads = store.redis.hmget(UNACKED_KEY, tags)
    picked: list[tuple[str, str, str, float | None]] = []
    for tag, payload in zip(tags, payloads, strict=True):
        job = _build_message_job(payload)
        if job is not None:
            picked.append((tag, *job))
    if not picked:
        return []
    entries: list[Any] = []
    for tag, _job_id, queue, eta in picked:
        entries += [tag, queue, int(eta * 1000) if eta else 0]
    restored = store.scripts.call(
        "restore_stalled", unacked=UNACKED_KEY, unacked_index=UNACKED_INDEX_KEY, workers=WORKERS,
        job_hashes=[job_key(job_id) for _, job_id, _, _ in picked], grace_ms=int(after_s * 1000),
        job_prefix=JOB_PREFIX, entries=entries,
    )  # fmt: skip
    requeued = [picked[int(i) - 1][1] for i in restored]
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
        job_id = str(headers["id"])
        if not job_id or "\n" in job_id or len(job_id) > 200:
            return None
        eta = headers.get("eta")
        return job_id, str(routing_key), datetime.fromisoformat(eta).timestamp() if eta else None
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


def release_expired_slots(store: JobStore, *, grace_s: float, batch: int = 200, offset: int = 0) -> list[str]:
    """Give back the slots of claims whose lease ran out more than ``grace_s`` ago; their job ids."""
    ids = [_text(v) for v in store.redis.zrangebyscore(JOBS_INDEX, "-inf", "(0", start=offset, num=batch)]
    if not ids:
        return []
    freed = store.scripts.call(
        "expired_slots", jobs_index=JOBS_INDEX, job_hashes=[job_key(j) for j in ids],
        grace_ms=int(grace_s * 1000), job_ids=ids,
    )  # fmt: skip
    out = [_text(j) for j in freed]
    if out:
        log.warning("gave back the daemon slots of %d dead claim(s): %s", len(out), ", ".join(out))
    return out


def trim_finished(store: JobStore, *, now: float) -> None:
    """Keep at most :data:`RECENT_MAX` ids, none enqueued before the result TTL, in each final
    band of the index (jobs whose hash expired with it)."""
    r = store.redis
    pipe = r.pipeline(transaction=False)
    bands = [state_band(state) for state in FINAL_STATES]
    for low, high in bands:
        pipe.zremrangebyscore(JOBS_INDEX, low, f"({low + now - store.result_ttl_s}")
        pipe.zcount(JOBS_INDEX, low, f"({high}")
    counts = pipe.execute()[1::2]
    for (low, high), count in zip(bands, counts, strict=True):
        if count > RECENT_MAX:  # the score of the oldest id to keep
            oldest = count - RECENT_MAX
            keep = r.zrangebyscore(JOBS_INDEX, low, f"({high}", start=oldest, num=1, withscores=True)
            if keep:
                r.zremrangebyscore(JOBS_INDEX, low, f"({keep[0][1]}")


class Janitor:
    """The deployment's janitor, run by whichever worker holds its lease (``owner``: this worker).
    Each pass walks a slice of ``batch`` entries per check, so a big backlog is walked in turn
    instead of its oldest entries being read again and again."""

    def __init__(
        self,
        store: JobStore,
        *,
        after_s: float,
        owner: str = "janitor",
        lease_s: float | None = None,
        daemons: Sequence[str] = (),
        slot_grace_s: float = 30.0,
        batch: int = 200,
    ) -> None:
        self.store, self.after_s, self.batch, self.owner = store, after_s, batch, owner
        self.lease_s = lease_s if lease_s is not None else max(3.0, 3 * after_s)
        self.daemons, self.slot_grace_s = tuple(daemons), slot_grace_s
        self._lost_offset = 0
        self._stalled_offset = 0
        self._slots_offset = 0
        self._passes = 0

    def holds_lease(self) -> bool:
        """Take or renew the deployment's janitor lease; whether this worker runs the janitor."""
        return bool(
            self.store.scripts.call(
                "lease", lease_key=JANITOR_LEASE, owner=self.owner, ttl_ms=max(1, int(self.lease_s * 1000))
            )
        )

    def run_once(self, now: float | None = None) -> list[str]:
        """One pass when this worker holds the lease (else nothing); the job ids put back."""
        if not self.holds_lease():
            return []
        clock = server_time(self.store) if now is None else now
        upto = min(clock - self.after_s, self._head_bound())
        lost, self._lost_offset = _requeue_lost(self.store, upto, self.batch, self._lost_offset)
        tags = self.store.redis.zcount(UNACKED_INDEX_KEY, "-inf", clock - self.after_s)
        if self._stalled_offset >= tags:
            self._stalled_offset = 0
        stalled = requeue_stalled(
            self.store, after_s=self.after_s, now=clock, batch=self.batch, offset=self._stalled_offset
        )
        self._stalled_offset += self.batch
        claimed = self.store.redis.zcount(JOBS_INDEX, "-inf", "(0")
        if self._slots_offset >= claimed:
            self._slots_offset = 0
        release_expired_slots(
            self.store, grace_s=self.slot_grace_s, batch=self.batch, offset=self._slots_offset
        )
        self._slots_offset += self.batch
        trim_finished(self.store, now=clock)
        if self.daemons and self._passes % 10 == 0:
            self.store.register_daemons(self.daemons, again=True)
        self._passes += 1
        return lost + stalled

    def _head_bound(self) -> float:
        """Epoch s before which every lost message was pushed: the newest head stamp of the queues
        (an empty queue: no bound), so a backlog's jobs are not even read."""
        r = self.store.redis
        queues = [_text(q) for q in r.smembers(QUEUES)]
        if not queues:
            return float("inf")
        pipe = r.pipeline(transaction=False)
        for queue in queues:
            pipe.lindex(queue, -1)
        heads = pipe.execute()
        bound = float("-inf")
        for head in heads:
            if head is None:
                return float("inf")
            stamp = self._stamp(head)
            if stamp is not None:
                bound = max(bound, stamp)
        return bound if bound > float("-inf") else float("inf")

    def _stamp(self, head: Any) -> float | None:
        """The ``pushed_at`` (epoch s) of the job whose current message is ``head``; None unknown."""
        try:
            message = json.loads(head)
            job_id = str(message["headers"]["id"])
            tag = message["properties"]["delivery_tag"]
        except (ValueError, TypeError, KeyError):
            return None
        got_tag, pushed = self.store.redis.hmget(job_key(job_id), ["tag", "pushed_at"])
        if got_tag is None or pushed is None or _text(got_tag) != tag:
            return None
        return float(pushed) / 1000
