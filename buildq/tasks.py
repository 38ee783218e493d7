"""Celery tasks: a thin shell around :class:`buildq.service.BuildService`."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from .app import TASK_NAME
from .service import LeaseLost, Reporter, RetryLater, WaitForDaemon
from .state import JobStore

#: custom Celery state while buildctl runs; ``info`` holds ``{"job_id", "attempt", "phase"}``
BUILDING = "BUILDING"
#: custom event type sent as each phase ends (``job_id``, ``attempt``, ``phase``, ``seconds``)
PHASE_EVENT = "task-phase"


class BuildFailed(Exception):
    """Raised after the failed record is stored, so Celery/Flower show the task as FAILURE."""


class TaskReporter(Reporter):
    """Live progress through Celery: the task state shows the current phase, an event per ended phase."""

    def __init__(self, task: Task, store: JobStore) -> None:
        self.task, self.store = task, store

    def phase_started(self, job_id: str, attempt: int, phase: str) -> None:
        self.task.update_state(state=BUILDING, meta={"job_id": job_id, "attempt": attempt, "phase": phase})
        self.store.update(job_id, phase=phase)

    def phase_ended(self, job_id: str, attempt: int, phase: str, seconds: float) -> None:
        self.task.send_event(
            PHASE_EVENT, job_id=job_id, attempt=attempt, phase=phase, seconds=round(seconds, 3)
        )


def register(app: Celery) -> None:
    """Register ``buildq.build`` on ``app``."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def build(
        self: Task, job: Any, enqueued_at: float | None = None, attempts: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        from .workers import service_for

        service = service_for(self.app)
        try:
            record = service.handle(
                job,
                enqueued_at=enqueued_at,
                attempts=attempts,
                task_id=self.request.id,
                reporter=TaskReporter(self, service.store),
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
        if record["state"] != "succeeded":
            error = record.get("error") or {}
            raise BuildFailed(f"{record['state']}: {error.get('kind')}: {error.get('message')}")
        return record
