"""The ``buildq.build`` Celery task: a thin shell around :class:`buildq.engine.service.BuildService`.

It turns the message into a :class:`~buildq.engine.interface.Delivery`, runs it on this process's
service (found through the app: ``app.buildq_runtime``) and carries out the engine's decisions:
a retry or a wait for a daemon goes back to the queue, a lost lease drops the delivery, a Redis
outage hands the message back.

A build that ends failed or cancelled raises :class:`BuildFailed` (an expected exception of the
task: Celery stores FAILURE, Flower shows it with the summary); the worker log gets one WARNING
line for it instead of Celery's line per failure (:class:`ExpectedFailureFilter`), while any
other exception still logs an ERROR with its traceback.
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
    """Raised after the failed (or cancelled) record is stored, so Celery and Flower show the task
    as FAILURE: ``args`` are the one-line reason (redacted, like the record) and the summary."""

    def __init__(self, text: str, summary: dict[str, Any]) -> None:
        super().__init__(text, summary)


def failure_text(record: dict[str, Any]) -> str:
    """``<state>: <error kind>: <message>`` on one line (the record is already redacted)."""
    error = record.get("error") or {}
    text = f"{record['state']}: {error.get('kind')}: {error.get('message')}"
    return " ".join(text.split())


class ExpectedFailureFilter(logging.Filter):
    """Drops Celery's own log line of an expected ``BuildFailed`` (the task logs its WARNING)."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        return not (isinstance(data, dict) and str(data.get("exc", "")).startswith("BuildFailed("))


EXPECTED_FAILURE_FILTER = ExpectedFailureFilter()


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

    # Celery logs an expected exception (``throws``) at INFO without traceback; that line goes,
    # the task's WARNING says it once (celery.app.trace is the logger of task outcomes)
    logging.getLogger("celery.app.trace").addFilter(EXPECTED_FAILURE_FILTER)

    @app.task(name=TASK_NAME, bind=True, max_retries=None, throws=(BuildFailed,))
    def build(
        self: Task,
        job: Any,
        enqueued_at: float | None = None,
        attempts: list[dict[str, Any]] | None = None,
        waiting_since: float | None = None,
        window_start: float | None = None,
    ) -> dict[str, Any]:
        runtime = self.app.buildq_runtime
        service = runtime.service()
        delivery = Delivery(
            job, enqueued_at, list(attempts or []), self.request.id,
            waiting_since=waiting_since, window_start=window_start,
        )  # fmt: skip
        # a retried message keeps the short arguments (Flower, logs), not the job and its attempts
        again = {"job": job, "enqueued_at": enqueued_at}
        try:
            record = service.handle(delivery, TaskReporter(self, service, runtime.events()))
        except RetryLater as later:
            kwargs = {**again, "attempts": later.attempts, "window_start": later.window_end}
            hand_back(self, service, later, kwargs)
        except WaitForDaemon as busy:
            # not an attempt: the same attempts go back to the queue; the wait counts as queued time
            kwargs = {**again, "attempts": attempts, "window_start": window_start}
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
            message = " ".join(str(error.get("message")).split())
            log.warning("build %s %s (%s): %s", record["job_id"], record["state"], error.get("kind"), message)
            raise BuildFailed(failure_text(record), summary(record))
        return summary(record)
