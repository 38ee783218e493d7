"""Putting a claimed job back on the queue (a retry, a wait for a daemon) without a moment where it
is nowhere: the next message is published first, the claim given back after.

On a Redis broker that is also the state Redis, one script publishes the next message (with its
ETA), makes it the janitor's copy and gives back lease and slot (:meth:`BuildService.requeue`);
then ``Retry`` tells Celery to mark the task RETRY and acknowledge the delivered message. On other
brokers Celery's own ``retry`` publishes; a failed publish hands the delivered message back to the
queue instead of acknowledging it (Celery would drop it).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, NoReturn

import redis.exceptions
from celery import Task
from celery.exceptions import Reject, Retry

from ..config import is_redis_url
from ..engine.interface import RetryLater, WaitForDaemon
from ..engine.service import BuildService
from ..store.connect import same_redis_url
from .producer import build_message, job_kwargsrepr


def same_redis(task: Task) -> bool:
    """The broker is Redis and the very Redis (and DB) buildq keeps its state in."""
    settings = task.app.buildq_settings
    return is_redis_url(settings.broker_url) and same_redis_url(
        settings, settings.state_redis_url, settings.broker_url
    )


def hand_back(
    task: Task, service: BuildService, back: RetryLater | WaitForDaemon, kwargs: dict[str, Any]
) -> NoReturn:
    """Re-queue the job with ``kwargs`` in ``back.countdown`` seconds; always raises."""
    hold = back.hold
    assert hold is not None
    phase = "retry_wait" if isinstance(back, RetryLater) else "waiting_for_daemon"
    if same_redis(task):
        due = time.time() + back.countdown
        queue = (task.request.delivery_info or {}).get("routing_key") or task.app.buildq_settings.queue
        tag = uuid.uuid4().hex
        message = build_message(
            hold.job_id, queue, kwargs, kwargsrepr=job_kwargsrepr(kwargs.get("job")), delivery_tag=tag,
            eta=due, retries=task.request.retries + 1,
        )  # fmt: skip
        try:
            published = service.requeue(hold, queue=queue, message=message, tag=tag, due=due, phase=phase)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Reject(f"redis unavailable: {exc}", requeue=True) from None
        if not published:
            raise Reject(f"job {hold.job_id} is owned by another delivery", requeue=False)
        raise Retry(when=back.countdown)
    try:
        retry = task.retry(
            kwargs=kwargs, countdown=back.countdown, max_retries=None, throw=False,
            argsrepr="()", kwargsrepr=job_kwargsrepr(kwargs.get("job")),
        )  # fmt: skip
    except Reject as failed:  # the retry was not published: the delivered message must not go
        raise Reject(failed.reason, requeue=True) from None
    service.release(hold)
    raise retry
