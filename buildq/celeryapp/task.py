"""The ``buildq.build`` Celery task: a thin shell around :class:`buildq.engine.service.BuildService`.

It turns the message into a :class:`~buildq.engine.interface.Delivery`, runs it on this process's
service (found through the app: ``app.buildq_runtime``) and carries out the engine's decisions:
a retry or a wait for a daemon goes back to the queue, a lost lease drops the delivery, a Redis
outage hands the message back.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from celery import Celery, Task
from celery.exceptions import Reject

from ..engine.interface import Delivery, LeaseLost, Reporter, RetryLater, WaitForDaemon
from ..names import BUILDING, TASK_NAME
from ..records import summary
from .events import DAEMON_DOWN_EVENT, PhaseEvents
from .handback import hand_back

log = logging.getLogger("buildq.tasks")


class BuildFailed(Exception):
    """Raised after the failed record is stored, so Celery/Flower show the task as FAILURE."""


class TaskReporter(Reporter):
    """Live progress through Celery: the task state shows the current phase, an event per ended phase.

    Phase events are buffered and published in batches (:mod:`buildq.celeryapp.events`). State
    writes go through the side channel (another thread), so they never delay buildctl's start or
    the stored result; ``handle`` drains it before the task returns.
    """

    def __init__(self, task: Task, service: Any, events: PhaseEvents) -> None:
        super().__init__()
        self.backend, self.service, self.events = task.backend, service, events
        self.task_id: str = task.request.id
        self.hostname: str = task.request.hostname or "buildq"

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

    def daemon_down(self, daemon: str, error: str) -> None:
        try:
            self.events.send_now(self.hostname, DAEMON_DOWN_EVENT, daemon=daemon, error=error)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("daemon event not sent: %s", exc)

    def _state(self, job_id: str, attempt: int, phase: str) -> None:
        if self.done:  # the result is stored: a late progress state must not cover it
            return
        self.backend.store_result(
            self.task_id, {"job_id": job_id, "attempt": attempt, "phase": phase}, BUILDING
        )
        self.service.store.update(job_id, phase=phase)


def register(app: Celery) -> None:
    """Register ``buildq.build`` on ``app`` (late acks and reject-on-lost come from the app config)."""

    @app.task(name=TASK_NAME, bind=True, max_retries=None)
    def build(
        self: Task,
        job: Any,
        enqueued_at: float | None = None,
        attempts: list[dict[str, Any]] | None = None,
        waiting_since: float | None = None,
    ) -> dict[str, Any]:
        runtime = self.app.buildq_runtime
        service = runtime.service()
        delivery = Delivery(job, enqueued_at, list(attempts or []), self.request.id, waiting_since)
        try:
            record = service.handle(delivery, TaskReporter(self, service, runtime.events()))
        except RetryLater as later:
            hand_back(
                self, service, later, {"job": job, "enqueued_at": enqueued_at, "attempts": later.attempts}
            )
        except WaitForDaemon as busy:
            # not an attempt: the same attempts go back to the queue; the wait counts as queued time
            kwargs = {"job": job, "enqueued_at": enqueued_at, "attempts": attempts}
            if busy.waiting_since is not None:  # every daemon is down: the wait has a limit
                kwargs["waiting_since"] = busy.waiting_since
            hand_back(self, service, busy, kwargs)
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
