"""The record of a build, built here and only here for every outcome (pure over data).

:func:`conclude` is what the lifecycle calls once an attempt ended and :func:`~buildq.engine.lifecycle.decide`
said what comes next: it makes the attempt's entry of ``attempts`` (its outcome and its own phases,
which tile its time window) and, when the job is over, the whole record (``phases`` the sum of its
attempts', ``image``, ``cache`` from the evidence, ``steps``, ``explain`` against the repository's
baseline), masks the secrets in every string of both, and validates the record against the
documented models (:func:`buildq.contract.record.validated_record`). :func:`rejected_record` is the
record of a job a worker found invalid, :func:`lost_entry` the entry of an attempt whose worker died.

All times are on the Redis server's clock: the worker measures on its own clock and shifts by its
offset to the server's, so records written by several workers line up whatever their clocks say.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..buildkit.phases import PHASES, LivePhases, Report, report
from ..contract.job import BuildJob
from ..contract.record import validated_record
from .redact import Redactor
from .runner import Outcome

#: the values of ``routing``
AFFINITY, LEAST_LOADED, FALLBACK = "affinity", "least_loaded", "fallback"
#: the phases of a record, all zero
ZERO_PHASES = dict.fromkeys((*PHASES, "total"), 0.0)


def _iso(ts: float | None) -> str | None:
    """Epoch seconds → RFC 3339 UTC with milliseconds (as :func:`buildq.contract.record.iso`)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def error_record(kind: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """The ``error`` member: kind (permanent | transient_exhausted | invalid | cancelled | timeout |
    daemon_unavailable)."""
    return {"kind": kind, "reason": reason, "message": message, **extra}


def outcome_error(outcome: Outcome) -> dict[str, Any] | None:
    """The ``error`` member for the last attempt's outcome (None when it succeeded)."""
    failure = outcome.failure
    if outcome.outcome == "succeeded" or failure is None:
        return None
    if outcome.outcome == "cancelled":
        return error_record("cancelled", "cancelled", failure.message)
    if outcome.outcome == "timeout":
        return error_record("timeout", "timeout", failure.message)
    kind = "transient_exhausted" if failure.transient else "permanent"
    return error_record(kind, failure.reason, failure.message)


def sum_phases(attempts: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Key-wise sum of the attempts' phases (they tile the build's timeline, so totals add up)."""
    total: dict[str, float] = {}
    for attempt in attempts:
        for name, seconds in (attempt.get("phases") or {}).items():
            total[name] = round(total.get(name, 0.0) + seconds, 3)
    return total or None


@dataclass(frozen=True)
class Concluded:
    """What :func:`conclude` made: the attempt's entry (None when nothing ran), the attempts so far,
    and for a job that is over its record (as built, and as the validated JSON to store), its
    summary (Celery's result), the cache export's outcome and its baseline entry; and the live
    phases that ended with the run."""

    entry: dict[str, Any] | None
    attempts: list[dict[str, Any]]
    record: dict[str, Any] | None = None
    record_json: str | None = None
    summary: dict[str, Any] | None = None
    export_outcome: str | None = None
    baseline_entry: bytes | None = None
    live_ended: list[tuple[str, float]] | None = None


def conclude(
    job: BuildJob,
    outcome: Outcome | None,
    earlier: Sequence[dict[str, Any]],
    *,
    offset: float,
    window_start: float,
    window_end: float,
    routing: str | None = None,
    live: LivePhases | None = None,
    state: str | None = None,
    gave_up: str | None = None,
    log_tail: Sequence[str] = (),
    enqueued_at: float = 0.0,
    worker: str | None = None,
    redactor: Redactor | None = None,
    baseline: Callable[[], Sequence[bytes]] | None = None,
    cache_key: str = "",
    pushed: Mapping[str, Any] | None = None,
    cache: CacheUse | None = None,
    superseded_by: str | None = None,
) -> Concluded:
    """The entry of the attempt that ended (``outcome``; None when nothing was launched) after the
    ``earlier`` attempts and, when the job is over (``state``), its whole record: ``gave_up`` is
    why no daemon ran it (``daemon_unavailable``), ``log_tail`` the failing step's last lines.
    Times: ``offset`` shifts this worker's clock to the server's; the attempt's window is
    ``[window_start, window_end]`` (server clock). Every string is masked by ``redactor``;
    ``baseline`` reads the repository's raw baseline entries, only when a phase or step took long
    enough to be compared. ``pushed``: what the registry holds of a pushed index (the image's
    ``platforms``, ``attestations``, ``registry_error``)."""
    entry = None
    rep = None
    if outcome is not None:
        first = outcome.tracker.first_output_at
        rep = report(
            outcome.tracker, enqueued_at=window_start, started_at=outcome.started_at + offset,
            first_output_at=first + offset if first is not None else None,
            exited_at=outcome.exited_at + offset, stored_at=window_end, metadata=outcome.metadata,
            export_requested=job.push and (cache is None or cache.exporting), succeeded=state == "succeeded",
            live=live,
        )  # fmt: skip
        entry = _entry(outcome, offset, routing, rep.phases)
    attempts = [*earlier, entry] if entry is not None else list(earlier)
    if redactor is not None:
        attempts = redactor.redact_tree(attempts)
        entry = attempts[-1] if entry is not None else None
    live_ended = rep.live_ended if rep is not None else None
    if state is None:
        return Concluded(entry, attempts, live_ended=live_ended)
    error = _error(state, outcome, attempts, gave_up)
    if error is not None and log_tail:
        error["log_tail"] = list(log_tail)
    record = _record(job, attempts, outcome, state, error, rep, window_end, routing, enqueued_at, worker)
    if pushed and record["image"] is not None:
        record["image"].update(pushed)
    _cache_use(record, job, cache, rep, superseded_by)
    if redactor is not None:
        record = redactor.redact_tree(record)
    phases, steps = record["phases"], record["slowest_steps"]
    if phases:
        raw = baseline() if baseline is not None and needs_baseline(phases, steps) else None
        entries = parse_entries(raw) if raw is not None else None
        record["explain"] = explain(phases, steps, entries, key=cache_key)
    text, summary = validated_record(record)
    added = baseline_entry(record)
    return Concluded(
        entry, attempts, record, text, summary,
        export_outcome=record["cache"]["export"] if record.get("cache") else None,
        baseline_entry=_encode(added).encode() if added is not None else None, live_ended=live_ended,
    )  # fmt: skip


@dataclass(frozen=True)
class CacheUse:
    """Which refs an attempt imported and exported (cache scopes) and whether it held the ref's
    export lease: ``lease`` granted | skipped_newer | skipped_busy."""

    export_ref: str
    imports: tuple[str, ...]
    lease: str = "granted"

    @property
    def exporting(self) -> bool:
        return self.lease == "granted"


def _cache_use(
    record: dict[str, Any],
    job: BuildJob,
    cache: CacheUse | None,
    rep: Report | None,
    superseded_by: str | None,
) -> None:
    """The record's cache scope parts: the refs, what became of the export; ``superseded_by``."""
    record["superseded_by"] = superseded_by
    member = record.get("cache")
    if member is None:
        return
    if cache is not None:
        member["ref"], member["imports"] = cache.export_ref, list(cache.imports)
    if not job.push:
        member["export"] = None
    elif cache is not None and not cache.exporting:
        member["export"] = cache.lease
    else:
        member["export"] = rep.cache.export_outcome if rep is not None else None


def _error(
    state: str, outcome: Outcome | None, attempts: Sequence[dict[str, Any]], gave_up: str | None
) -> dict[str, Any] | None:
    """The ``error`` member of a record in ``state``."""
    if gave_up is not None:
        return error_record("daemon_unavailable", "daemon_unavailable", gave_up)
    if outcome is not None:
        return outcome_error(outcome)
    if state == "cancelled":
        return error_record("cancelled", "cancelled", "build cancelled before it started")
    last = attempts[-1] if attempts else {}  # lost attempts used up the retries
    return error_record(
        "transient_exhausted", str(last.get("reason") or "worker_lost"), str(last.get("error") or "")
    )


def _entry(outcome: Outcome, offset: float, routing: str | None, phases: dict[str, float]) -> dict[str, Any]:
    failure = outcome.failure
    return {
        "number": outcome.number,
        "daemon": outcome.daemon or None,
        "started_at": _iso(outcome.started_at + offset),
        "finished_at": _iso(outcome.exited_at + offset),
        "duration_s": round(outcome.exited_at - outcome.started_at, 3),
        "outcome": outcome.outcome,
        "exit_code": outcome.exit_code,
        "reason": failure.reason if failure else None,
        "error": failure.message if failure else None,
        "reached_daemon": outcome.reached_daemon,
        "routing": routing if outcome.daemon else None,
        "phases": phases,
    }


def _record(
    job: BuildJob,
    attempts: list[dict[str, Any]],
    last: Outcome | None,
    state: str,
    error: dict[str, Any] | None,
    rep: Report | None,
    finished_at: float,
    routing: str | None,
    enqueued_at: float,
    worker: str | None,
) -> dict[str, Any]:
    metadata = (last.metadata if last is not None else None) or {}
    first_started = min((a["started_at"] for a in attempts if a.get("started_at")), default=None)
    started_ts = datetime.fromisoformat(first_started).timestamp() if first_started else finished_at
    evidence = rep.cache if rep is not None else None
    return {
        "job_id": job.job_id,
        "retry_of": job.retry_of or None,
        "state": state,
        "phase": "done",
        "attempt": len(attempts) or None,
        "worker": worker or None,
        "daemon": (last.daemon or None) if last is not None else None,
        "enqueued_at": _iso(enqueued_at),
        "started_at": first_started,
        "finished_at": _iso(finished_at),
        "duration_s": round(max(0.0, finished_at - started_ts), 3),
        "image": {
            "names": list(job.tags),
            "digest": metadata.get("containerimage.digest"),
            "pushed": job.push and state == "succeeded",
        },
        "cache": {
            "ref": job.cache_ref,
            "imported": evidence.imported if evidence else False,
            "import_error": evidence.import_error if evidence else None,
            "exported": evidence.exported if evidence else False,
            "error": evidence.error if evidence else None,
        },
        "attempts": attempts,
        "error": error,
        "phases": sum_phases(attempts),
        "steps": rep.steps if rep is not None else None,
        "slowest_steps": rep.slowest if rep is not None else [],
        "routing": routing if last is not None and last.daemon else None,
        "explain": None,
    }


def lost_entry(running: Mapping[str, Any], *, number: int, now: float) -> dict[str, Any]:
    """The entry of an attempt whose worker died (or was fenced out) mid-build, from what the claim
    wrote when it took the job (``running``: started_at, daemon, and the error that interrupted it
    when its worker could still say) and when the next claim found it (``now``): outcome ``lost``,
    counted like any attempt that reached its daemon."""
    started = running.get("started_at")
    started_at = float(started) if isinstance(started, int | float) else now
    seconds = round(max(0.0, now - started_at), 3)
    daemon = running.get("daemon")
    return {
        "number": number,
        "daemon": daemon if isinstance(daemon, str) and daemon else None,
        "started_at": _iso(started_at),
        "finished_at": _iso(max(started_at, now)),
        "duration_s": seconds,
        "outcome": "lost",
        "exit_code": None,
        "reason": "worker_lost",
        "error": str(running.get("error") or "the worker running this attempt died or lost its claim"),
        "reached_daemon": True,
        "routing": None,
        "phases": {**ZERO_PHASES, "other": seconds, "total": seconds},
    }


def rejected_record(
    job_id: str,
    *,
    message: str,
    field: str,
    enqueued_at: float,
    finished_at: float,
    worker: str | None = None,
    retry_of: str | None = None,
) -> dict[str, Any]:
    """The record of a job the worker rejected as invalid (``error.kind: invalid``, the field named)."""
    return {
        "job_id": job_id,
        "retry_of": retry_of or None,
        "state": "failed",
        "phase": "done",
        "attempt": None,
        "worker": worker or None,
        "daemon": None,
        "enqueued_at": _iso(enqueued_at),
        "started_at": None,
        "finished_at": _iso(finished_at),
        "duration_s": 0.0,
        "image": None,
        "cache": None,
        "attempts": [],
        "error": error_record("invalid", "invalid_job", message, field=field),
        "phases": None,
        "steps": None,
        "slowest_steps": [],
        "routing": None,
        "explain": None,
        "superseded_by": None,
    }


#: made once (``json.dumps`` with options makes an encoder per call)
_encode = json.JSONEncoder(separators=(",", ":")).encode


def parse_entries(items: Sequence[bytes]) -> list[dict[str, Any]]:
    """The baseline entries of an ``LRANGE`` reply, parsed at once; one that is not a JSON object
    is skipped."""
    if not items:
        return []
    try:
        parsed = json.loads(b"[" + b",".join(items) + b"]")
    except ValueError:
        parsed = []
        for item in items:
            try:
                parsed.append(json.loads(item))
            except ValueError:
                continue
    return [entry for entry in parsed if isinstance(entry, dict)]


# ----------------------------------------------------------------------------------------------
# Whether a finished build was unusually slow, against the recent builds of its repository (pure).
#
# A *baseline* is a list of entries, one per earlier build of the same cache key
# (:func:`~buildq.contract.job.cache_key`) that succeeded in a single attempt, newest first, as
# :func:`baseline_entry` makes them: ``{"p": {phase: seconds}, "s": {step name: seconds}}`` with the
# phases of :data:`~buildq.buildkit.phases.PHASES` and the build's slowest Dockerfile steps (the
# record's ``slowest_steps``, at most 5).
#
# :func:`explain` compares one build with its baseline. A phase, or one of the build's slowest steps,
# is *flagged* when it took at least :data:`RATIO` times its median over the baseline **and** at
# least :data:`MIN_EXCESS_S` seconds more than that median. Phases are compared only when the
# baseline holds at least :data:`MIN_BUILDS` builds (otherwise the record says so), a step only when
# at least that many of them list it. A build none of whose phases or steps took
# :data:`MIN_EXCESS_S` cannot be flagged whatever its baseline, so the baseline need not be read
# (:func:`needs_baseline`).
#
# The record's ``explain``::
#
#     {"key": "registry:5000/team/app:buildcache", "builds": 50,
#      "flagged": [{"phase": "cache_import", "seconds": 31.2, "median": 0.4, "ratio": 78.0, "builds": 50}],
#      "summary": "cache_import 31.2 s, 78× its median of 0.4 s over the last 50 builds"}
#
# A flagged step has ``"phase": "step"`` and ``"step": "<name>"``; ``ratio`` is null when the median
# is 0; ``builds`` is null when the baseline was not read.
#: a phase is flagged at RATIO × its median or more ...
RATIO = 3.0
#: ... and at least this many seconds above it
MIN_EXCESS_S = 2.0
#: fewer earlier builds than this: nothing is compared
MIN_BUILDS = 5
#: step names are kept (and compared) up to this length
STEP_NAME_MAX = 200
_EPS = 1e-9  # phases have millisecond resolution: 1.2 is 3 × 0.4

Entry = Mapping[str, Any]


def baseline_entry(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a finished record adds to its repository's baseline, or None: only a build that
    succeeded in one attempt is a usual build (a retried one's phases hold its failed attempts)."""
    phases = record.get("phases")
    if record.get("state") != "succeeded" or len(record.get("attempts") or ()) != 1 or not phases:
        return None
    steps = {str(s["name"])[:STEP_NAME_MAX]: s["seconds"] for s in record.get("slowest_steps") or ()}
    return {"p": {name: phases[name] for name in PHASES if name in phases}, "s": steps}


def needs_baseline(phases: Mapping[str, float], steps: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any phase or step took long enough to be flagged (MIN_EXCESS_S or more)."""
    if any(phases.get(name, 0.0) + _EPS >= MIN_EXCESS_S for name in PHASES):
        return True
    return any(s["seconds"] + _EPS >= MIN_EXCESS_S for s in steps)


def is_slow(seconds: float, median: float) -> bool:
    """The rule: at least RATIO × the median and at least MIN_EXCESS_S above it."""
    return seconds + _EPS >= RATIO * median and seconds - median + _EPS >= MIN_EXCESS_S


def compare(seconds: float, values: Sequence[float]) -> dict[str, Any] | None:
    """The flag for ``seconds`` against the baseline ``values`` (None: not slow, or too few values)."""
    if len(values) < MIN_BUILDS:
        return None
    median = round(statistics.median(values), 3)
    if not is_slow(seconds, median):
        return None
    ratio = round(seconds / median, 1) if median > 0 else None
    return {"seconds": seconds, "median": median, "ratio": ratio, "builds": len(values)}


def explain(
    phases: Mapping[str, float] | None,
    steps: Sequence[Mapping[str, Any]],
    baseline: Sequence[Entry] | None,
    *,
    key: str,
) -> dict[str, Any] | None:
    """The record's ``explain`` for a build with these ``phases`` and ``slowest_steps``.

    ``baseline`` is the repository's entries (None when not read: :func:`needs_baseline` said no).
    """
    if not phases:
        return None
    out: dict[str, Any] = {"key": key, "builds": None, "flagged": [], "summary": ""}
    if not needs_baseline(phases, steps):
        out["summary"] = f"nothing unusual: no phase or step took {MIN_EXCESS_S:g} s or more"
        return out
    builds = list(baseline or ())
    out["builds"] = n = len(builds)
    if n < MIN_BUILDS:
        plural = "" if n == 1 else "s"
        out["summary"] = f"not compared: {n} earlier build{plural} of {key} on record, {MIN_BUILDS} needed"
        return out
    flagged: list[dict[str, Any]] = []
    for name in PHASES:
        values = [e["p"][name] for e in builds if name in e.get("p", ())]
        found = compare(phases.get(name, 0.0), values)
        if found is not None:
            flagged.append({"phase": name, **found})
    for step in steps:
        name = str(step["name"])[:STEP_NAME_MAX]
        values = [e["s"][name] for e in builds if name in e.get("s", ())]
        found = compare(step["seconds"], values)
        if found is not None:
            flagged.append({"phase": "step", "step": name, **found})
    flagged.sort(key=lambda f: -(f["seconds"] - f["median"]))
    out["flagged"] = flagged
    if flagged:
        out["summary"] = ""  # worded from the flags by buildq.contract.record.validated_record
    else:
        out["summary"] = f"nothing unusual against the last {n} builds"
    return out
