"""The JSON record of a build, built here and only here for every outcome and state (pure).

One documented shape (README "Result record", JSON Schema in :mod:`buildq.contract.record`): every
state has ``job_id``, ``state``, ``phase``, ``attempt``, ``worker``, ``daemon``, ``enqueued_at``,
``started_at``; a finished one (succeeded | failed | cancelled) also ``finished_at``,
``duration_s``, ``image``, ``cache``, ``attempts``, ``error``, ``phases``, ``steps``,
``slowest_steps``. :func:`final_record` for a build that was claimed, :func:`rejected_record` for a
job the worker found invalid, :func:`job_status` for what a reader gets in any state (from the job
hash or the stored record), :func:`summary` for what Celery stores as the task result.
The record's ``daemon`` and ``routing`` are those of the last attempt; ``explain`` is filled in by
the engine (:mod:`buildq.engine.explain`).
Nothing internal is in a record; :func:`redact_strings` masks secrets in one before it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .buildkit.cacheevidence import CacheEvidence, cache_evidence
from .buildkit.classify import NEVER_REACHED_REASON, Failure
from .buildkit.phases import compute_phases, slowest_steps, step_stats
from .buildkit.progress import ProgressTracker
from .contract.job import BuildJob


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
    #: why this daemon: affinity | least_loaded | fallback (:func:`routing_reason`; None: no daemon)
    routing: str | None = None


#: the values of ``routing``
AFFINITY, LEAST_LOADED, FALLBACK = "affinity", "least_loaded", "fallback"


def routing_reason(preferred: str | None, chosen: str | None) -> str | None:
    """Why ``chosen`` ran the build: ``affinity`` when it is the daemon that last built with the
    job's cache (``preferred``), ``fallback`` when another one was taken instead (the remembered one
    was down, stayed full past ``BUILDQ_AFFINITY_WAIT_S``, or was avoided after losing the build),
    ``least_loaded`` when none was remembered (first build, expired, affinity off); None: no daemon."""
    if chosen is None:
        return None
    if preferred is None:
        return LEAST_LOADED
    return AFFINITY if chosen == preferred else FALLBACK


def iso(ts: float | None) -> str | None:
    """Epoch seconds → RFC 3339 UTC with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(text: str | None) -> float | None:
    """RFC 3339 (as :func:`iso` writes it) → epoch seconds."""
    return datetime.fromisoformat(text).timestamp() if text else None


Redact = Callable[[str], str]


def redact_strings(value: Any, redact: Redact | None) -> Any:
    """``value`` with ``redact`` applied to every string in it (dict keys kept); as is without one."""
    if redact is None:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_strings(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_strings(v, redact) for v in value]
    return value


def attempt_record(attempt: AttemptOutcome, *, window_start: float, window_end: float) -> dict[str, Any]:
    """One entry of ``attempts``: number, times, outcome, reason, error line and its own phases.

    The attempt's phases tile ``[window_start, window_end]``: from the enqueue (or the end of the
    previous attempt, so a retry's backoff counts as ``queued``) to its result or retry decision.
    ``window_end`` itself is not part of the record: a retry carries it beside the attempts.
    """
    failure = attempt.failure
    return {
        "number": attempt.number,
        "daemon": attempt.daemon or None,
        "started_at": iso(attempt.started_at),
        "finished_at": iso(attempt.exited_at),
        "duration_s": round(attempt.exited_at - attempt.started_at, 3),
        "outcome": attempt.outcome,
        "exit_code": attempt.exit_code,
        "reason": failure.reason if failure else None,
        "error": failure.message if failure else None,
        "reached_daemon": attempt.reached_daemon,
        "routing": attempt.routing,
        "phases": compute_phases(
            attempt.tracker if attempt.tracker is not None else ProgressTracker(),
            enqueued_at=window_start,
            started_at=attempt.started_at,
            first_output_at=attempt.first_output_at,
            exited_at=attempt.exited_at,
            stored_at=window_end,
        ),
    }


def window_start_of(earlier: list[dict[str, Any]], carried: float | None, enqueued_at: float) -> float:
    """Where the next attempt's time window starts: the end of the previous attempt's window (carried
    by the retry), the enqueue for a first attempt. Messages of older workers kept ``window_end`` in
    the attempt itself; without either, the previous attempt's ``finished_at``."""
    if not earlier:
        return enqueued_at
    if carried is not None:
        return float(carried)
    last = earlier[-1]
    if isinstance(last.get("window_end"), int | float):
        return float(last["window_end"])
    return epoch(last.get("finished_at")) or enqueued_at


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


def build_cache_evidence(job: BuildJob, last: AttemptOutcome | None, state: str) -> CacheEvidence:
    """The cache evidence of the last attempt (its vertices and metadata file)."""
    tracker = last.tracker if last is not None else None
    return cache_evidence(
        tracker.vertices.values() if tracker is not None else (),
        last.metadata if last is not None else None,
        export_requested=job.push,
        succeeded=state == "succeeded",
    )


def final_record(
    job: BuildJob,
    *,
    state: str,
    attempts: list[dict[str, Any]],
    last: AttemptOutcome | None,
    enqueued_at: float,
    finished_at: float,
    error: dict[str, Any] | None,
    worker: str | None = None,
    cache: CacheEvidence | None = None,
) -> dict[str, Any]:
    """The whole record; ``phases`` is the sum of the attempts' phases (enqueue → result stored).
    ``cache`` defaults to :func:`build_cache_evidence` of the last attempt."""
    metadata = (last.metadata if last else None) or {}
    first_started = min((a["started_at"] for a in attempts if a.get("started_at")), default=None)
    started_ts = epoch(first_started) or finished_at
    ev = cache if cache is not None else build_cache_evidence(job, last, state)
    record: dict[str, Any] = {
        **_common(
            job.job_id,
            state,
            "done",
            len(attempts) or None,
            worker,
            (last.daemon or None) if last else None,
            job.retry_of,
        ),
        "enqueued_at": iso(enqueued_at),
        "started_at": first_started,
        "finished_at": iso(finished_at),
        "duration_s": round(max(0.0, finished_at - started_ts), 3),
        "image": {
            "names": list(job.tags),
            "digest": metadata.get("containerimage.digest"),
            "pushed": job.push and state == "succeeded",
        },
        "cache": {
            "ref": job.cache_ref,
            "imported": ev.imported,
            "import_error": ev.import_error,
            "exported": ev.exported,
            "error": ev.error,
        },
        "attempts": attempts,
        "error": error,
        "phases": sum_phases(attempts),
        "steps": None,
        "slowest_steps": [],
        "routing": last.routing if last else None,
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
    worker: str | None = None,
    retry_of: str | None = None,
) -> dict[str, Any]:
    """The record of a job the worker rejected as invalid (``error.kind: invalid``, the field named)."""
    return {
        **_common(job_id, "failed", "done", len(attempts) or None, worker, None, retry_of),
        "enqueued_at": iso(enqueued_at),
        "started_at": None,
        "finished_at": iso(finished_at),
        "duration_s": 0.0,
        "image": None,
        "cache": None,
        "attempts": attempts,
        "error": error_record("invalid", "invalid_job", message, field=field),
        "phases": None,
        "steps": None,
        "slowest_steps": [],
        "daemon": None,
        "routing": None,
        "explain": None,
    }


def _common(
    job_id: str,
    state: str,
    phase: str | None,
    attempt: int | None,
    worker: str | None,
    daemon: str | None,
    retry_of: str | None = None,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "retry_of": retry_of or None,
        "state": state,
        "phase": phase,
        "attempt": attempt,
        "worker": worker or None,
        "daemon": daemon or None,
    }


#: fields of a stored attempt that only older workers wrote (internal; never shown)
_INTERNAL_ATTEMPT_FIELDS = ("window_end",)


def public_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored final record in the documented shape (records of older workers brought up to it)."""
    attempts = [
        {k: v for k, v in a.items() if k not in _INTERNAL_ATTEMPT_FIELDS}
        for a in record.get("attempts") or []
    ]
    last = attempts[-1] if attempts else {}
    common = _common(
        str(record["job_id"]),
        str(record["state"]),
        "done",
        len(attempts) or None,
        record.get("worker"),
        record.get("daemon", last.get("daemon")),
        record.get("retry_of"),
    )
    rest = {k: v for k, v in record.items() if k not in common}
    return {**common, "routing": None, "explain": None, **rest, "attempts": attempts}


_PENDING_STATES = ("queued", "running")


def job_status(job_id: str, info: Mapping[str, str], record: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a reader gets for ``job_id`` in any state: the stored record once finished, else the job
    hash (``buildq:job:<id>``, all strings) in the same shape: ``attempt`` a number, times ISO
    strings, and none of the hash's internal fields (message, delivery tag, claim count, queue)."""
    if record is not None:
        return public_record(record)
    state = info.get("state")
    if state not in _PENDING_STATES:  # never seen (or its hash expired)
        return {**_common(job_id, "unknown", None, None, None, None), "enqueued_at": None, "started_at": None}
    attempt = info.get("attempt")
    phase = info.get("phase") or ("queued" if state == "queued" else None)
    return {
        **_common(
            job_id,
            state,
            phase,
            int(attempt) if attempt else None,
            info.get("worker"),
            info.get("daemon"),
            info.get("retry_of"),
        ),
        "enqueued_at": iso(_float(info.get("enqueued_at"))),
        "started_at": iso(_float(info.get("started_at"))),
    }


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What Celery stores as the task result (Flower shows it): the outcome, the phases and the step
    counts; the full record is ``buildq status --json``."""
    image = record.get("image") or {}
    cache = record.get("cache") or {}
    error = record.get("error") or {}
    return {
        "job_id": record["job_id"],
        "state": record["state"],
        "error": error.get("kind"),
        "digest": image.get("digest"),
        "names": image.get("names"),
        "cache_exported": cache.get("exported"),
        "attempts": len(record.get("attempts") or []),
        "duration_s": record.get("duration_s"),
        "phases": record.get("phases"),
        "steps": record.get("steps"),
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
