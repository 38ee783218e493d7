"""The job record as every reader gets it, in every state, as pydantic models (``buildq schema --record``).

:func:`buildq.records.job_status` (``buildq status --json``, ``BuildqClient.status``) and the
stored final record (``buildq submit --wait --json``, ``handle.wait()``, Redis
``buildq:result:<id>``) have this shape; ``tests/test_record_schema.py`` validates real outputs of
each state against :func:`record_schema`. Every object is closed (``additionalProperties: false``):
a field that is not documented here is not in a record.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

#: RFC 3339 UTC with milliseconds, as ``buildq.records.iso`` writes it
Time = Annotated[
    str,
    Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", json_schema_extra={"format": "date-time"}),
]
Seconds = Annotated[float, Field(ge=0)]
PENDING_STATES = ("queued", "running", "unknown")
FINISHED_STATES = ("succeeded", "failed", "cancelled")


Routing = Literal["affinity", "least_loaded", "fallback"] | None


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Phases(_Closed):
    """Seconds per phase (README "Timings"); the named phases plus ``other`` add up to ``total``."""

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


class Attempt(_Closed):
    number: Annotated[int, Field(ge=1)]
    daemon: str | None
    started_at: Time
    finished_at: Time
    duration_s: Seconds
    outcome: Literal["succeeded", "failed", "cancelled", "timeout"]
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
    """A job that has not finished: queued (also between attempts), running, or unknown to buildq."""

    state: Literal["queued", "running", "unknown"]


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


JobRecord = Annotated[PendingRecord | FinishedRecord, Field(discriminator="state")]


def record_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a job record in any state."""
    schema = TypeAdapter(JobRecord).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "buildq job record",
        "description": "buildq status --json, buildq submit --wait --json, BuildqClient.status/wait",
        **schema,
    }
