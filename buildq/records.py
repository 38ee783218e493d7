"""The JSON result record of a build, built here and only here for every outcome (pure).

Shape (see the README): ``job_id``, ``state`` (succeeded | failed | cancelled), ``image``
(``names``, ``digest``), ``cache`` (``ref``), ``started_at``, ``finished_at``, ``duration_s``,
``attempts`` (list), ``error`` (``kind``, ``reason``, ``message``) or null, ``phases``, ``steps``,
``slowest_steps``, ``explain`` (filled in by the engine, see :mod:`buildq.explain`).
:func:`final_record` for a build that was claimed, :func:`rejected_record` for a job the worker
found invalid, :func:`summary` for what Celery stores as the task result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .buildkit.classify import NEVER_REACHED_REASON, Failure
from .buildkit.phases import compute_phases, slowest_steps, step_stats
from .buildkit.progress import ProgressTracker
from .jobs import BuildJob


@dataclass
class AttemptOutcome:
    """What one buildctl invocation did. ``outcome`` is succeeded | failed | cancelled | timeout."""

    number: int
    daemon: str
    started_at: float
    exited_at: float
    outcome: str
    exit_code: int | None = None
    failure: Failure | None = None
    metadata: dict[str, Any] | None = None
    tracker: ProgressTracker | None = None
    first_output_at: float | None = None
    #: buildctl talked to the daemon (False: it could not dial it, or never ran)
    reached_daemon: bool = True


def iso(ts: float | None) -> str | None:
    """Epoch seconds → RFC 3339 UTC with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def attempt_record(attempt: AttemptOutcome, *, window_start: float, window_end: float) -> dict[str, Any]:
    """One entry of ``attempts``: number, times, outcome, reason, error line and its own phases.

    The attempt's phases tile ``[window_start, window_end]``: from the enqueue (or the end of the
    previous attempt, so a retry's backoff counts as ``queued``) to its result or retry decision.
    """
    failure = attempt.failure
    record: dict[str, Any] = {
        "number": attempt.number,
        "daemon": attempt.daemon,
        "started_at": iso(attempt.started_at),
        "finished_at": iso(attempt.exited_at),
        "duration_s": round(attempt.exited_at - attempt.started_at, 3),
        "outcome": attempt.outcome,
        "exit_code": attempt.exit_code,
        "reason": failure.reason if failure else None,
        "error": failure.message if failure else None,
        "reached_daemon": attempt.reached_daemon,
        "window_end": window_end,
        "phases": compute_phases(
            attempt.tracker if attempt.tracker is not None else ProgressTracker(),
            enqueued_at=window_start,
            started_at=attempt.started_at,
            first_output_at=attempt.first_output_at,
            exited_at=attempt.exited_at,
            stored_at=window_end,
        ),
    }
    return record


def counts_as_attempt(attempt: dict[str, Any]) -> bool:
    """Whether an attempt record counts against ``BUILDQ_RETRY_MAX_ATTEMPTS``: every attempt but
    one that never reached its daemon (dialing failed: nothing was built)."""
    return bool(attempt.get("reached_daemon", True)) or attempt.get("reason") != NEVER_REACHED_REASON


def unreached_since(attempts: list[dict[str, Any]]) -> float | None:
    """When the trailing run of attempts that never reached a daemon began (epoch), else None."""
    since = None
    for attempt in reversed(attempts):
        if counts_as_attempt(attempt):
            break
        if attempt.get("started_at"):
            since = datetime.fromisoformat(attempt["started_at"]).timestamp()
    return since


def sum_phases(attempts: list[dict[str, Any]]) -> dict[str, float] | None:
    """Key-wise sum of the attempts' phases (they tile the build's timeline, so totals add up)."""
    total: dict[str, float] = {}
    for attempt in attempts:
        for name, seconds in (attempt.get("phases") or {}).items():
            total[name] = round(total.get(name, 0.0) + seconds, 3)
    return total or None


def error_record(kind: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """The ``error`` member: kind (permanent | transient_exhausted | invalid | cancelled | timeout)."""
    return {"kind": kind, "reason": reason, "message": message, **extra}


def final_record(
    job: BuildJob,
    *,
    state: str,
    attempts: list[dict[str, Any]],
    last: AttemptOutcome | None,
    enqueued_at: float,
    finished_at: float,
    error: dict[str, Any] | None,
) -> dict[str, Any]:
    """The whole record; ``phases`` is the sum of the attempts' phases (enqueue → result stored)."""
    metadata = (last.metadata if last else None) or {}
    first_started = min((a["started_at"] for a in attempts if a.get("started_at")), default=None)
    started_ts = datetime.fromisoformat(first_started).timestamp() if first_started else finished_at
    record: dict[str, Any] = {
        "job_id": job.job_id,
        "state": state,
        "image": {
            "names": list(job.tags),
            "digest": metadata.get("containerimage.digest"),
            "pushed": job.push and state == "succeeded",
        },
        "cache": {"ref": job.cache_ref, "exported": job.push},
        "enqueued_at": iso(enqueued_at),
        "started_at": first_started,
        "finished_at": iso(finished_at),
        "duration_s": round(max(0.0, finished_at - started_ts), 3),
        "attempts": attempts,
        "error": error,
        "phases": sum_phases(attempts),
        "steps": None,
        "slowest_steps": [],
        "explain": None,
    }
    if last is not None and last.tracker is not None:
        record["steps"] = step_stats(last.tracker)
        record["slowest_steps"] = slowest_steps(last.tracker)
    return record


def rejected_record(
    job_id: str,
    *,
    message: str,
    field: str,
    attempts: list[dict[str, Any]],
    enqueued_at: float,
    finished_at: float,
) -> dict[str, Any]:
    """The record of a job the worker rejected as invalid (``error.kind: invalid``, the field named)."""
    return {
        "job_id": job_id,
        "state": "failed",
        "image": None,
        "cache": None,
        "enqueued_at": iso(enqueued_at),
        "started_at": None,
        "finished_at": iso(finished_at),
        "duration_s": 0.0,
        "attempts": attempts,
        "error": error_record("invalid", "invalid_job", message, field=field),
        "phases": None,
        "steps": None,
        "slowest_steps": [],
        "explain": None,
    }


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


def outcome_state(outcome: AttemptOutcome) -> tuple[str, dict[str, Any] | None]:
    """The final ``state`` and ``error`` member for the last attempt's outcome."""
    if outcome.outcome == "succeeded":
        return "succeeded", None
    failure = outcome.failure
    assert failure is not None
    if outcome.outcome == "cancelled":
        return "cancelled", error_record("cancelled", "cancelled", failure.message)
    if outcome.outcome == "timeout":
        return "failed", error_record("timeout", "timeout", failure.message)
    kind = "transient_exhausted" if failure.transient else "permanent"
    return "failed", error_record(kind, failure.reason, failure.message)
