"""Ending a delivery before anything is built: a job the worker rejects, an orphan to kill first."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..contract.job import JOB_ID_PATTERN
from ..errors import InvalidJobError
from ..launchers.base import Launcher
from ..records import redact_strings, rejected_record
from .interface import Delivery, LeaseLost

if TYPE_CHECKING:
    from .service import BuildService


def reject(
    service: BuildService,
    delivery: Delivery,
    exc: InvalidJobError,
    enqueued: float,
    earlier: list[dict[str, Any]],
) -> dict[str, Any]:
    """An invalid job: a failed record naming the field; buildctl is never launched.

    The record is written only when the job has no result and no live delivery: a duplicate
    delivery on a misconfigured worker never overwrites another worker's record (it returns that
    record, or raises LeaseLost while the job is being built).
    """
    message = delivery.message
    job_id = message.get("job_id") if isinstance(message, dict) else None
    if not isinstance(job_id, str) or not job_id:
        job_id = delivery.task_id or "unknown"
    record = rejected_record(
        job_id, message=exc.message, field=exc.field, attempts=earlier, enqueued_at=enqueued,
        finished_at=service.clock(), worker=service.worker_id, retry_of=_retry_of(message),
    )  # fmt: skip
    record = redact_strings(record, service.redactor.redact if service.redactor is not None else None)
    if job_id != "unknown" and not service.store.store_rejected(job_id, record):
        existing = service.store.result(job_id)
        if existing is not None:
            return existing  # a duplicate delivery of a finished job: its record stands
        raise LeaseLost(f"job {job_id} is being built by another delivery; this one is dropped")
    service.metrics.build_finished(record)
    return record


def kill_orphan(launcher: Launcher, job_id: str) -> None:
    """Kill a buildctl an earlier delivery of ``job_id`` may have left running (best effort)."""
    try:
        launcher.kill_orphan(job_id)
    except Exception:  # noqa: BLE001 - best effort, the build goes on
        pass


def _retry_of(message: object) -> str | None:
    """The ``retry_of`` of an invalid job's message, when it is a job id."""
    value = message.get("retry_of") if isinstance(message, dict) else None
    return value if isinstance(value, str) and re.match(JOB_ID_PATTERN, value) else None
