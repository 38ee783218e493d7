"""Celery tasks: a thin shell around :class:`buildq.service.BuildService`."""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from celery import Celery, Task
from celery.exceptions import Reject

from .app import TASK_NAME
from .events import phase_events
from .service import LeaseLost, Reporter, RetryLater, WaitForDaemon
from .workers import service_for

log = logging.getLogger("buildq.tasks")

#: custom Celery state while buildctl runs; ``info`` holds ``{"job_id", "attempt", "phase"}``
BUILDING = "BUILDING"


class BuildFailed(Exception):
    """Raised after the failed record is stored, so Celery/Flower show the task as FAILURE."""


class TaskReporter(Reporter):
    """Live progress through Celery: the task state shows the current phase, an event per ended phase.

    Phase events are buffered and published in batches (:mod:`buildq.events`). State writes go
    through the side channel (another thread), so they never delay buildctl's start or the stored
    result; ``handle`` drains it before the task returns.
    """

    def __init__(self, task: Task, service: Any) -> None:
        super().__init__()
        self.app, self.backend, self.service = task.app, task.backend, service
        self.task_id: str = task.request.id
        self.hostname: str = task.request.hostname or "buildq"
        self.events = phase_events(task.app, service.ticker)

    def phase_started(self, job_id: str, attempt: int, phase: str) -> None:
        self.service.side.submit(self._state, job_id, attempt, phase)

    def phase_ended(self, job_id: str, attempt: int, phase: str, seconds: float) -> None:
        try:
            self.events.send(
                self.hostname,
                uuid=self.task_id,
                job_id=job_id,
                attempt=attempt,
                phase=phase,
                seconds=round(seconds, 3),
            )
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the build goes on
            log.warning("phase event not sent: %s", exc)

    def _state(self, job_id: str, attempt: int, phase: str) -> None:
        if self.done:  # the result is stored: a late progress state must not cover it
            return
        self.backend.store_result(
            self.task_id, {"job_id": job_id, "attempt": attempt, "phase": phase}, BUILDING
        )
        self.service.store.update(job_id, phase=phase)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What Celery stores as the task result (the full record is ``buildq status --json``)."""
    image = record.get("image") or {}
    return {
        "job_id": record["job_id"],
        "state": record["state"],
        "digest": image.get("digest"),
        "names": image.get("names"),
        "duration_s": record.get("duration_s"),
    }


def register(app: Celery) -> None:
    """Register ``buildq.build`` on ``app``."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def build(
        self: Task, job: Any, enqueued_at: float | None = None, attempts: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        service = service_for(self.app)
        try:
            record = service.handle(
                job,
                enqueued_at=enqueued_at,
                attempts=attempts,
                task_id=self.request.id,
                reporter=TaskReporter(self, service),
            )
        except RetryLater as later:
            raise self.retry(
                kwargs={"job": job, "enqueued_at": enqueued_at, "attempts": later.attempts},
                countdown=later.countdown,
                max_retries=None,
            ) from None
        except WaitForDaemon as busy:
            # not an attempt: the same attempts go back to the queue; the wait counts as queued time
            raise self.retry(
                kwargs={"job": job, "enqueued_at": enqueued_at, "attempts": attempts},
                countdown=busy.countdown,
                max_retries=None,
            ) from None
        except LeaseLost as lost:
            # another delivery owns the job: drop this one without storing anything
            raise Reject(str(lost), requeue=False) from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as lost_redis:
            # Redis went away mid-build: hand the message back instead of acknowledging a build
            # that has no record (if the broker is down too, it stays unacknowledged and returns)
            raise Reject(f"redis unavailable: {lost_redis}", requeue=True) from None
        if record["state"] != "succeeded":
            error = record.get("error") or {}
            raise BuildFailed(f"{record['state']}: {error.get('kind')}: {error.get('message')}")
        return summary(record)
