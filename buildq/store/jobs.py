"""Job state in Redis: the job hash, the result record, leases and cancellation flags.

Key names are in :mod:`buildq.store.keys`; taking and finishing a job are in
:mod:`buildq.store.claim`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any

import redis

from ..errors import NotReplicatedError
from .connect import execute_waiting
from .keys import (
    QUEUED_INDEX,
    RECENT_INDEX,
    RECENT_MAX,
    cancel_key,
    done_channel,
    job_key,
    lease_key,
    result_key,
)
from .scripts import Scripts, source

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class _LeasesAndCancellation:
    """The lease and cancellation-flag operations of :class:`JobStore` (kept apart for size)."""

    redis: redis.Redis
    scripts: Scripts
    result_ttl_s: int

    # -- leases ------------------------------------------------------------------------------
    @staticmethod
    def new_token() -> str:
        return uuid.uuid4().hex

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Extend our lease, or take it again when it expired and nobody took it; False when another
        delivery holds it now."""
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(self.scripts("renew_lease")(keys=[lease_key(job_id)], args=[token, ttl_ms]))

    def queue_release_lease(self, pipe: Any, job_id: str, token: str) -> None:
        """Queue on ``pipe`` deleting the job's lease if it is still ``token``'s (as EVAL: a
        registered script would make the pipeline check the script cache first, one more round
        trip). Taking the lease is part of :func:`buildq.store.claim.claim`."""
        pipe.eval(source("release_lease"), 1, lease_key(job_id), token)

    def lease_holder(self, job_id: str) -> str | None:
        raw = self.redis.get(lease_key(job_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    # -- cancellation ------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(cancel_key(job_id), "1", ex=self.result_ttl_s)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))


class JobStore(_LeasesAndCancellation):
    """Reads and writes job state; one instance per process, sharing one connection pool."""

    def __init__(self, client: redis.Redis, *, result_ttl_s: int, replicas: Any = None) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.scripts = Scripts(client, replicas)  # replicas: see buildq.store.connect.Replicas
        self._local = threading.local()

    @classmethod
    def from_url(cls, url: str, *, result_ttl_s: int) -> JobStore:
        return cls(
            redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30), result_ttl_s=result_ttl_s
        )

    # -- records -----------------------------------------------------------------------------
    def mark_queued(
        self,
        job_id: str,
        enqueued_at: float,
        queue: str,
        *,
        message: bytes | None = None,
        tag: str = "",
        job: str | None = None,
        retry_of: str | None = None,
    ) -> None:
        """Record a submitted job, after its message is sent (``HSETNX``: never overwrites a worker's
        ``running``). With ``message`` (Redis broker on this same Redis) it is pushed to ``queue`` in
        the same round trip, and kept (with its delivery ``tag``) until a worker claims the job, so
        the janitor can send it again if the broker loses it; ``WAIT`` ends it when replicas are
        wanted (:class:`~buildq.errors.NotReplicatedError` when too few confirm). ``job`` (its
        JSON) is kept for ``buildq retry``; the id goes in the ``recent`` index (trimmed here)
        for ``buildq list``."""
        pipe = self.redis.pipeline(transaction=False)
        key = job_key(job_id)
        if message is not None:
            pipe.lpush(queue, message)
        pipe.hsetnx(key, "state", "queued")
        fields: dict[Any, Any] = {"enqueued_at": repr(enqueued_at), "queue": queue}
        if message is not None:
            fields[b"msg"], fields[b"tag"] = message, tag
            pipe.zadd(QUEUED_INDEX, {job_id: enqueued_at})
        if job is not None:
            fields["job"] = job
        if retry_of:
            fields["retry_of"] = retry_of
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.result_ttl_s)
        pipe.zadd(RECENT_INDEX, {job_id: enqueued_at})
        pipe.zremrangebyrank(RECENT_INDEX, 0, -RECENT_MAX - 1)
        pipe.zremrangebyscore(RECENT_INDEX, "-inf", f"({enqueued_at - self.result_ttl_s!r}")
        if (missing := execute_waiting(pipe, self.scripts.replicas)) is not None:
            raise NotReplicatedError(job_id, *missing)

    def update(self, job_id: str, fields: dict[str, Any] | None = None, **more: Any) -> None:
        """Set fields of the job hash (``state``, ``phase``, ``attempt``, ``worker``); it expires."""
        values = {**(fields or {}), **more}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(job_key(job_id), mapping={k: str(v) for k, v in values.items()})
        pipe.expire(job_key(job_id), self.result_ttl_s)
        pipe.execute()

    def info(self, job_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def store_rejected(self, job_id: str, record: dict[str, Any]) -> bool:
        """Store the record of a job this worker rejected, unless the job already has a result or a
        live delivery (a duplicate on a misconfigured worker never overwrites); True when stored."""
        keys = [result_key(job_id), job_key(job_id), lease_key(job_id), QUEUED_INDEX]
        args = [json.dumps(record, separators=(",", ":")), record["state"], self.result_ttl_s]
        args += [done_channel(job_id), job_id]
        what = f"record of job {job_id}"
        return bool(self.scripts.durable("store_rejected", keys=keys, args=args, what=what))

    def requeue(
        self,
        job_id: str,
        token: str,
        *,
        queue: str,
        message: bytes,
        tag: str,
        due: float,
        phase: str,
        slot_key: str | None,
    ) -> bool:
        """Publish the job's next message and give back its claim, atomically; False (nothing
        published) when the lease is another delivery's. The message becomes the janitor's copy."""
        keys = [queue, job_key(job_id), lease_key(job_id), slot_key or "", QUEUED_INDEX]
        args = [message, tag, token, job_id, repr(due), phase, self.result_ttl_s, 1 if slot_key else 0]
        return bool(self.scripts.durable("requeue", keys=keys, args=args, what=f"requeue of job {job_id}"))

    def result(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(result_key(job_id))
        return json.loads(raw) if raw else None

    def wait_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """Block until the job's record is stored (or ``timeout`` passes); None on timeout.

        Subscribes to the job's "done" channel first, then reads the record (so a record stored in
        between is not missed), through one subscriber connection per thread kept between calls (a
        new connection per wait would cost more than the wait itself).
        """
        pubsub = self._subscriber()
        channel = done_channel(job_id).encode()
        clean = False
        try:
            pubsub.subscribe(channel)
            deadline = None if timeout is None else time.monotonic() + timeout
            check = True
            while True:
                if check:
                    record = self.result(job_id)
                    if record is not None:
                        clean = True
                        return record
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    clean = True
                    return None
                # re-check at least every second: a publish before we subscribed is not lost
                message = pubsub.get_message(timeout=left)
                check = message is None or message.get("channel") == channel
        finally:
            if clean:
                pubsub.unsubscribe(channel)
            else:  # broken or interrupted: start afresh next time
                self._local.__dict__.pop("pubsub", None)
                pubsub.close()

    def _subscriber(self) -> Any:
        """This thread's subscriber (made again in a forked child: sockets are not shared)."""
        held = getattr(self._local, "pubsub", None)
        if held is None or held[0] != os.getpid():
            held = (os.getpid(), self.redis.pubsub(ignore_subscribe_messages=True))
            self._local.pubsub = held
        return held[1]
