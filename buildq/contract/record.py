"""The job record, in every state, as pydantic models: the one description of it (pure).

The worker builds a finished record once and validates it here (:func:`validated_record`) before
it is stored; :func:`record_schema` (``buildq schema --record``) is generated from the same models.
Readers get every state in this shape: the stored record (``buildq submit --wait --json``,
``handle.wait()``, Redis ``buildq:result:<id>``) as it is, a job that has not finished from its
job hash (:func:`job_status`). Every object is closed (``additionalProperties: false``): a field
that is not documented here is not in a record. :func:`summary` is what Celery keeps as the task's
result. Nothing here parses build output: showing a record needs no parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .job import job_id_time

#: RFC 3339 UTC with milliseconds, as :func:`iso` writes it
Time = Annotated[
    str,
    Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", json_schema_extra={"format": "date-time"}),
]
Seconds = Annotated[float, Field(ge=0)]
PENDING_STATES = ("queued", "running", "unknown", "lost")
FINISHED_STATES = ("succeeded", "failed", "cancelled")


Routing = Literal["affinity", "least_loaded", "fallback"] | None


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Phases(_Closed):
    """Seconds per phase (docs/timings.md); the named phases plus ``other`` add up to ``total``."""

    queued: Seconds
    launch: Seconds
    context: Seconds
    cache_import: Seconds
    build: Seconds
    export_image: Seconds
    push: Seconds
    cache_export: Seconds
    finalize: Seconds
    other: Seconds
    total: Seconds


class Image(_Closed):
    names: list[str] = Field(description="the job's tags")
    digest: str | None = Field(description="containerimage.digest of buildctl's metadata file")
    pushed: bool


class Cache(_Closed):
    """The registry cache, from evidence: the import/export vertices and the metadata file."""

    ref: str | None
    imported: bool = Field(description="the cache manifest was found and imported (a cold miss: false)")
    import_error: str | None = Field(description="an import error other than a miss (redacted)")
    exported: bool = Field(description="export vertex completed without error and cache.manifest present")
    error: str | None = Field(description="why the export failed (redacted); null when not reached")
    imports: list[str] | None = Field(
        default=None,
        description="the refs imported from, in order (a scoped build: its scope's, then the default's)",
    )
    export: Literal["exported", "failed", "skipped", "skipped_newer", "skipped_busy"] | None = Field(
        default=None,
        description="the export: exported | failed | skipped (ended before it) | skipped_newer (a newer "
        "build holds or did the ref's export) | skipped_busy (an older build still exported after "
        "BUILDQ_CACHE_EXPORT_WAIT_S); null: no export asked (push false)",
    )


class Attempt(_Closed):
    number: Annotated[int, Field(ge=1)]
    daemon: str | None
    started_at: Time
    finished_at: Time
    duration_s: Seconds
    outcome: Literal["succeeded", "failed", "cancelled", "timeout", "lease_lost", "lost"] = Field(
        description="lease_lost: another delivery claimed the job while this attempt ran; lost: its "
        "worker died (or lost its claim) before the attempt ended"
    )
    exit_code: int | None
    reason: str | None = Field(description="the classifier's reason of a failure")
    error: str | None = Field(description="buildctl's error line (redacted)")
    reached_daemon: bool = Field(
        default=True, description="false: buildctl could not dial the daemon (not counted as an attempt)"
    )
    routing: Routing = Field(default=None, description="why this daemon (null: no daemon was chosen)")
    phases: Phases


class Error(_Closed):
    kind: Literal["permanent", "transient_exhausted", "invalid", "timeout", "cancelled", "daemon_unavailable"]
    reason: str
    message: str = Field(description="buildctl's final error line, or why the job was rejected (redacted)")
    field: str | None = Field(default=None, description="kind invalid: the offending job field")
    log_tail: list[str] | None = Field(default=None, description="last output lines of the failing step")


class Steps(_Closed):
    total: Annotated[int, Field(ge=0)]
    cached: Annotated[int, Field(ge=0)]
    executed: Annotated[int, Field(ge=0)]
    cache_hit_ratio: Annotated[float, Field(ge=0, le=1)]


class SlowStep(_Closed):
    name: str
    seconds: Seconds
    cached: bool


class Flag(_Closed):
    phase: str = Field(description="the flagged phase, or `step` for a Dockerfile step")
    step: str | None = Field(default=None, description="the step's name (phase `step`)")
    seconds: Seconds
    median: Seconds = Field(description="its median over the baseline builds")
    ratio: float | None = Field(description="seconds / median (null when the median is 0)")
    builds: int = Field(description="baseline builds compared with")


class Explain(_Closed):
    key: str = Field(description="the repository's cache key the baseline is kept under")
    builds: int | None = Field(description="earlier builds in the baseline (null: not read, nothing ≥ 2 s)")
    flagged: list[Flag]
    summary: str = Field(description="one sentence per flag, or why nothing was compared")


class _Common(_Closed):
    job_id: str
    retry_of: str | None = Field(description="the job this one runs again (buildq retry); null otherwise")
    phase: str | None = Field(
        description="queued, retry_wait, waiting_for_daemon, launch … cache_export (running), done"
    )
    attempt: Annotated[int, Field(ge=1)] | None = Field(description="number of the current or last attempt")
    worker: str | None = Field(description="host:pid of the worker process of that attempt")
    daemon: str | None = Field(description="BuildKit daemon of that attempt")
    enqueued_at: Time | None
    started_at: Time | None = Field(description="start of the first attempt")


class PendingRecord(_Common):
    """A job that has not finished: queued (also between attempts), running, unknown to buildq, or
    lost (its id says it was made before the data of the Redis asked began: a restart without
    persistence lost it)."""

    state: Literal["queued", "running", "unknown", "lost"]


class FinishedRecord(_Common):
    """A finished job: the stored result record."""

    state: Literal["succeeded", "failed", "cancelled"]
    finished_at: Time
    duration_s: Seconds
    image: Image | None = Field(description="null for a job the worker rejected")
    cache: Cache | None = Field(description="null for a job the worker rejected")
    attempts: list[Attempt]
    error: Error | None
    phases: Phases | None
    steps: Steps | None
    slowest_steps: list[SlowStep]
    routing: Routing = Field(default=None, description="why the last attempt's daemon (cache affinity)")
    explain: Explain | None = Field(default=None, description="is this build slow for its repository?")
    superseded_by: str | None = Field(
        default=None, description="cancelled: the newer job of its supersede_key that cancelled it"
    )


JobRecord = Annotated[PendingRecord | FinishedRecord, Field(discriminator="state")]
_FINISHED = TypeAdapter(FinishedRecord)


def record_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a job record in any state."""
    schema = TypeAdapter(JobRecord).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "buildq job record",
        "description": "buildq status --json, buildq submit --wait --json, BuildqClient.status/wait",
        **schema,
    }


def validated_record(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A finished record checked against :class:`FinishedRecord` (ValidationError when it is not
    one): the JSON that is stored, and its :func:`summary`. The ``explain`` summary of flagged
    phases is worded here (:func:`sentence`), with the wording every reader uses."""
    explained = record.get("explain")
    if explained and explained.get("flagged") and not explained.get("summary"):
        explained["summary"] = "; ".join(sentence(flag) for flag in explained["flagged"])
    return _FINISHED.validate_python(record).model_dump_json(), summary(record)


def seconds_text(value: float) -> str:
    """``31.2``, ``0.4``, ``0`` — and milliseconds below a tenth (``0.017``)."""
    if value == 0:
        return "0"
    return f"{value:.3f}" if value < 0.1 else f"{value:.1f}"


def sentence(flag: Mapping[str, Any]) -> str:
    """``cache_import 31.2 s, 78× its median of 0.4 s over the last 50 builds``."""
    what = f'step "{flag["step"]}"' if flag["phase"] == "step" else flag["phase"]
    seconds, median, ratio = flag["seconds"], flag["median"], flag["ratio"]
    over = f"over the last {flag['builds']} builds"
    if ratio is None:
        return f"{what} {seconds_text(seconds)} s against a median of 0 s {over}"
    times = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
    return f"{what} {seconds_text(seconds)} s, {times}× its median of {seconds_text(median)} s {over}"


def iso(ts: float | None) -> str | None:
    """Epoch seconds → RFC 3339 UTC with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(text: str | None) -> float | None:
    """RFC 3339 (as :func:`iso` writes it) → epoch seconds."""
    return datetime.fromisoformat(text).timestamp() if text else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _common(
    job_id: str, state: str, phase: str | None, attempt: int | None, worker: str | None,
    daemon: str | None, retry_of: str | None = None,
) -> dict[str, Any]:  # fmt: skip
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
        str(record["job_id"]), str(record["state"]), "done", len(attempts) or None, record.get("worker"),
        record.get("daemon", last.get("daemon")), record.get("retry_of"),
    )  # fmt: skip
    rest = {k: v for k, v in record.items() if k not in common}
    return {**common, "routing": None, "explain": None, "superseded_by": None, **rest, "attempts": attempts}


_PENDING_STATES = ("queued", "running")


#: a job id made this long before the Redis epoch is lost, not merely unknown (clock slack)
LOST_SLACK_S = 5.0


def job_status(
    job_id: str, info: Mapping[str, str], record: Mapping[str, Any] | None, epoch: float | None = None
) -> dict[str, Any]:
    """What a reader gets for ``job_id`` in any state: the stored record once finished, else the job
    hash (``buildq:job:<id>``, all strings) in the same shape: ``attempt`` a number, times ISO
    strings, and none of the hash's internal fields (message, history, claim generation, queue).
    A job buildq has nothing about is ``unknown``, or ``lost`` when its id (one the client made)
    dates from before ``epoch``, when the Redis asked began holding buildq's data."""
    if record is not None:
        return public_record(record)
    state = info.get("state")
    if state not in _PENDING_STATES:  # never seen (or its hash expired)
        made = job_id_time(job_id)
        lost = epoch is not None and made is not None and made < epoch - LOST_SLACK_S
        empty = {"enqueued_at": iso(made) if lost else None, "started_at": None}
        return {**_common(job_id, "lost" if lost else "unknown", None, None, None, None), **empty}
    attempt = info.get("attempt")
    phase = info.get("phase") or ("queued" if state == "queued" else None)
    return {
        **_common(
            job_id,
            state,
            phase,
            int(attempt) if attempt and attempt.isdigit() else None,
            info.get("worker"),
            info.get("daemon"),
            info.get("retry_of"),
        ),  # fmt: skip
        "enqueued_at": iso(_float(info.get("enqueued_at"))),
        "started_at": iso(_float(info.get("started_at"))),
    }


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What Celery stores as the task result (Flower shows it): the outcome, the attempts (their
    number, and ``history``: each one's outcome and reason, ``#1 failed (goaway)``), the phases and
    the step counts; the full record is ``buildq status --json``."""
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
        "history": [
            f"#{a.get('number')} {a.get('outcome')}" + (f" ({a['reason']})" if a.get("reason") else "")
            for a in record.get("attempts") or []
        ],
        "duration_s": record.get("duration_s"),
        "phases": record.get("phases"),
        "steps": record.get("steps"),
    }
