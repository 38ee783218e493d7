"""The job record, in every state, as pydantic models: the one description of it (pure).

The worker builds a finished record once and validates it here (:func:`validated_record`) before
it is stored; :func:`record_schema` (``buildq schema --record``) is generated from the same models.
Readers get every state in this shape: the stored record (``buildq submit --wait --json``,
``handle.wait()``, field ``record`` of Redis ``buildq:job:<id>``) as it is, a job that has not
finished from its job hash (:func:`job_status`). Every object is closed
(``additionalProperties: false``): a field that is not documented here is not in a record.
:func:`summary` is what Celery keeps as the task's result. Nothing here parses build output:
showing a record needs no parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .status import (  # noqa: F401 - re-exported: the record's reader views
    LOST_SLACK_S,
    _float,
    epoch,
    iso,
    job_id_time,
    job_status,
    public_record,
    seconds_text,
    sentence,
)

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


class Attestation(_Closed):
    """An attestation manifest of the pushed index (docs/attestations.md)."""

    digest: str = Field(description="the attestation manifest's digest")
    subject: str = Field(description="the image manifest it is for (vnd.docker.reference.digest)")
    platform: str | None = Field(description="that manifest's platform")
    predicate_types: list[str] = Field(description="its in-toto statements' predicate types")
    statements: list[str] = Field(description="the digests of its in-toto statement layers")


class Image(_Closed):
    names: list[str] = Field(description="the job's tags")
    digest: str | None = Field(
        description="containerimage.digest of buildctl's metadata file (the index's when one was pushed)"
    )
    pushed: bool
    platforms: dict[str, str] | None = Field(
        default=None,
        description="platform (os/arch[/variant]) → its manifest digest, as the registry holds the "
        "pushed index; null: no index was pushed (one platform, no attestation) or it was not read",
    )
    attestations: list[Attestation] = Field(
        default_factory=list, description="the index's attestation manifests"
    )
    registry_error: str | None = Field(
        default=None, description="why the pushed index could not be read back (the build still succeeded)"
    )


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
