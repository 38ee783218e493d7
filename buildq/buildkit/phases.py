"""Per-phase timing of a build, computed from a :class:`~buildq.buildkit.progress.ProgressTracker`.

Stream phases, by vertex name (see :func:`classify`):

* ``context``: ``[internal] load ...`` (build definition, .dockerignore, build context, and also
  ``[internal] load metadata for <image>``: base-image resolution is part of turning the
  Dockerfile into an LLB graph, it happens before any step runs and BuildKit itself files it under
  ``[internal] load``, so it is counted with the other loads rather than as a step);
* ``cache_import``: ``importing cache manifest from ...``;
* ``build``: Dockerfile steps (``[2/3] COPY ...``, ``[stage-1 1/1] RUN ...``) and any vertex not
  named by another rule;
* ``export_image``: ``exporting to ...`` (``exporting to image``) minus its push statuses;
* ``push``: statuses ``pushing layers`` / ``pushing manifest for ...`` of that vertex, clipped to it;
* ``cache_export``: ``exporting cache to ...`` (``exporting cache to registry``).

Each phase is the wall-clock union of its intervals (overlaps inside a phase count once). Phases
that run at the same time are made disjoint so that they add up: an instant covered by several
phases is given to the first of :data:`PRIORITY` (push, export_image, cache_export, build,
cache_import, context: the later pipeline stage wins). The sum of the stream phases is therefore
the union of all their intervals.

Clock rule: stream timestamps come from the daemon, whose clock may be skewed from the worker's.
Only offsets inside the stream are used: a stream time ``t`` maps to the worker time
``first_output_at + (t - anchor)``, where ``anchor`` is ``tracker.first_timestamp`` (the earliest
time in the first timestamped line; for a bare vertex table, its earliest run start). Mapped
intervals are clipped to ``[first_output_at, exited_at]``; a run or status still open at the end
of the stream ends at ``exited_at``. A skewed daemon clock therefore shifts nothing, and no phase
can be negative or fall outside the stream.

Outer phases come from the caller's clock: queued (enqueued→started), launch (started→first
output), finalize (exited→stored), other (time inside the stream window not covered by any stream
phase), total (enqueued→stored). The outer times are made monotone first: ``enqueued_at`` (set by
another host) is taken as no later than ``started_at``, and each later time as no earlier than its
predecessor. Rounding: every value is an integer number of milliseconds, apportioned by largest
remainder (each phase is floored, and the leftover milliseconds of ``round(total)`` go to the
phases with the largest fractions), so the named phases plus ``other`` equal ``total`` exactly in
milliseconds and every value is within 1 ms of its exact value and never negative.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, overload

from .progress import ProgressTracker, Run, SolveStatus, VertexState

Table = Mapping[str, VertexState]
Interval = tuple[float, float]

STREAM_PHASES = ("context", "cache_import", "build", "export_image", "push", "cache_export")
PRIORITY = ("push", "export_image", "cache_export", "build", "cache_import", "context")
PHASES = ("queued", "launch", *STREAM_PHASES, "finalize", "other")
ALL_KEYS = (*PHASES, "total")

_STEP_RE = re.compile(r"^\[(?:\S+ )?\d+/\d+\] ")
_PUSH_PREFIXES = ("pushing layers", "pushing manifest for ")


class StreamPhases(NamedTuple):
    """Seconds per stream phase (disjoint) and their union (== their sum)."""

    phases: dict[str, float]
    union: float


class StepRow(TypedDict):
    """One row of :func:`slowest_steps`."""

    name: str
    seconds: float
    cached: bool


def is_step(name: str) -> bool:
    """True for a Dockerfile step vertex such as ``[1/2] COPY ...`` or ``[base 3/3] RUN ...``."""
    return _STEP_RE.match(name) is not None


def classify(name: str) -> str:
    """Stream phase of a vertex name (never ``push``: pushes are statuses)."""
    if name.startswith("[internal] load "):
        return "context"
    if name.startswith("importing cache manifest from "):
        return "cache_import"
    if name.startswith("exporting cache to "):
        return "cache_export"
    if name.startswith("exporting to "):
        return "export_image"
    return "build"


def is_push_status(status_id: str) -> bool:
    return status_id.startswith(_PUSH_PREFIXES)


def _table(source: ProgressTracker | Table) -> Table:
    return source.vertices if isinstance(source, ProgressTracker) else source


def _anchor(source: ProgressTracker | Table) -> float | None:
    if isinstance(source, ProgressTracker):
        return source.first_timestamp
    starts = [r[0] for v in source.values() for r in v.runs]
    return min(starts) if starts else None


def subtract(base: list[Interval], cut: list[Interval]) -> list[Interval]:
    """``base`` minus ``cut``; both sorted and disjoint."""
    out: list[Interval] = []
    j = 0
    for a, b in base:
        while j < len(cut) and cut[j][1] <= a:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < b:
            if cut[k][0] > a:
                out.append((a, cut[k][0]))
            a = max(a, cut[k][1])
            k += 1
        if a < b:
            out.append((a, b))
    return out


def length(intervals: Iterable[Interval]) -> float:
    return float(sum(b - a for a, b in intervals))


def _closed(runs: Iterable[Run], open_end: float) -> list[Interval]:
    return [(a, open_end if b is None else b) for a, b in runs]


def phase_intervals(
    source: ProgressTracker | Table, *, open_end: float = math.inf
) -> dict[str, list[Interval]]:
    """Per stream phase, the union of its intervals in stream time (before priority and clipping).

    Open runs/statuses end at ``open_end``. ``export_image`` already excludes ``push``.
    """
    raw: dict[str, list[Interval]] = {p: [] for p in STREAM_PHASES}
    for v in _table(source).values():
        phase = classify(v.name)
        runs = union(_closed(v.runs, open_end), drop_empty=True)
        raw[phase].extend(runs)
        if phase != "export_image":
            continue
        pushes: list[Interval] = []
        for st in v.statuses.values():
            start = st.started if st.started is not None else st.timestamp
            if start is None or not is_push_status(st.id or st.name):
                continue
            end = open_end if st.completed is None else st.completed
            pushes.extend((max(a, start), min(b, end)) for a, b in runs)
        raw["push"].extend(pushes)
    out = {p: union(iv, drop_empty=True) for p, iv in raw.items()}
    out["export_image"] = subtract(out["export_image"], out["push"])
    return out


def stream_phases(
    source: ProgressTracker | Table, *, first_output_at: float | None, exited_at: float
) -> StreamPhases:
    """Seconds per stream phase on the worker's clock, clipped to [first_output_at, exited_at]."""
    zero = {p: 0.0 for p in STREAM_PHASES}
    anchor = _anchor(source)
    if first_output_at is None or anchor is None or exited_at <= first_output_at:
        return StreamPhases(zero, 0.0)
    window_len = exited_at - first_output_at
    per_phase = phase_intervals(source, open_end=math.inf)
    claimed: list[Interval] = []
    phases = dict(zero)
    for name in PRIORITY:
        # Offsets from the anchor, clipped to the window [0, window_len].
        pieces = ((max(a - anchor, 0.0), min(b - anchor, window_len)) for a, b in per_phase[name])
        clipped = union(pieces, drop_empty=True)
        own = subtract(clipped, claimed)
        phases[name] = length(own)
        claimed = union([*claimed, *own], drop_empty=True)
    return StreamPhases(phases, length(claimed))


def apportion_ms(values: Mapping[str, float], total: float) -> dict[str, float]:
    """Integer milliseconds for ``values`` (which sum to ``total``), summing to round(total) ms."""
    target = round(total * 1000)
    scaled = {k: max(v, 0.0) * 1000 for k, v in values.items()}
    floors = {k: math.floor(x) for k, x in scaled.items()}
    left = target - sum(floors.values())
    rank = sorted(enumerate(scaled), key=lambda ik: (floors[ik[1]] - scaled[ik[1]], ik[0]))
    for _, k in rank[: max(left, 0)]:
        floors[k] += 1
    return {k: ms / 1000 for k, ms in floors.items()}


def compute_phases(
    source: ProgressTracker | Table,
    *,
    enqueued_at: float,
    started_at: float,
    first_output_at: float | None,
    exited_at: float,
    stored_at: float,
) -> dict[str, float]:
    """All phases and ``total`` in seconds (ms resolution); the phases other than total sum to total.

    ``first_output_at`` None means buildctl printed nothing (then ``tracker.first_output_at`` is
    used if the source is a tracker, else launch runs up to ``exited_at``). Use one tracker per
    attempt of a retried build and call this with that attempt's times.
    """
    if first_output_at is None and isinstance(source, ProgressTracker):
        first_output_at = source.first_output_at
    t1 = started_at
    t0 = min(enqueued_at, t1)
    t2 = max(first_output_at if first_output_at is not None else exited_at, t1)
    t3 = max(exited_at, t2)
    t4 = max(stored_at, t3)
    stream = stream_phases(source, first_output_at=t2, exited_at=t3)
    exact: dict[str, float] = {"queued": t1 - t0, "launch": t2 - t1, **stream.phases, "finalize": t4 - t3}
    exact["other"] = max((t3 - t2) - stream.union, 0.0)
    out = apportion_ms({k: exact[k] for k in PHASES}, t4 - t0)
    out["total"] = round((t4 - t0) * 1000) / 1000
    return out


@dataclass(frozen=True)
class Report:
    """Everything a record says about one attempt's stream, computed at once by :func:`report`."""

    #: its phases (:func:`compute_phases`, tiling its time window)
    phases: dict[str, float]
    #: its Dockerfile steps (:func:`step_stats`) and the slowest of them (:func:`slowest_steps`)
    steps: dict[str, int | float]
    slowest: list[StepRow]
    #: what the stream and the metadata file say of the registry cache
    cache: CacheEvidence
    #: the live phases that ended with the run (the current one, then ``finalize`` began)
    live_ended: list[tuple[str, float]]


def report(
    tracker: ProgressTracker,
    *,
    enqueued_at: float,
    started_at: float,
    first_output_at: float | None,
    exited_at: float,
    stored_at: float,
    metadata: Mapping[str, Any] | None,
    export_requested: bool,
    succeeded: bool,
    live: LivePhases | None = None,
) -> Report:
    """The whole :class:`Report` of one attempt (one pass over its tracker)."""
    phases = compute_phases(
        tracker, enqueued_at=enqueued_at, started_at=started_at, first_output_at=first_output_at,
        exited_at=exited_at, stored_at=stored_at,
    )  # fmt: skip
    evidence = cache_evidence(
        tracker.vertices.values(), metadata, export_requested=export_requested, succeeded=succeeded
    )
    ended = live.finish() if live is not None else []
    return Report(phases, step_stats(tracker), slowest_steps(tracker), evidence, ended)


def _latest(table: Table) -> float:
    return max((t for v in table.values() for r in v.runs for t in r if t is not None), default=0.0)


def step_stats(source: ProgressTracker | Table) -> dict[str, int | float]:
    """Dockerfile steps that started or were cache hits: total, cached, executed, cache_hit_ratio."""
    steps = [v for v in _table(source).values() if is_step(v.name) and (v.runs or v.cached)]
    cached = sum(1 for v in steps if v.cached)
    total = len(steps)
    return {
        "total": total,
        "cached": cached,
        "executed": total - cached,
        "cache_hit_ratio": cached / total if total else 0.0,
    }


def slowest_steps(source: ProgressTracker | Table, n: int = 5) -> list[StepRow]:
    """The ``n`` Dockerfile steps with the longest run time (stream durations, ms resolution).

    A step still running at the end of the stream counts up to the last time in the stream.
    """
    table = _table(source)
    last = source.last_timestamp if isinstance(source, ProgressTracker) else None
    open_end = last if last is not None else _latest(table)
    rows = sorted(
        (-round(length(union(_closed(v.runs, open_end), drop_empty=True)), 3), v.name, v.cached)
        for v in table.values()
        if is_step(v.name) and v.runs
    )
    return [StepRow(name=name, seconds=-neg, cached=cached) for neg, name, cached in rows[:n]]


# ----------------------------------------------------------------------------------------------
# Unions of time intervals (pure), shared by the phase computation and the plain-log renderer.
#
# An interval is ``(start, end)``; ``end`` may be None for one still open, which reaches to the end
# of time and so swallows every interval that starts after it.
Closed = tuple[float, float]
Open = tuple[float, float | None]


@overload
def union(intervals: Iterable[Closed], *, drop_empty: bool = False) -> list[Closed]: ...
@overload
def union(intervals: Iterable[Open], *, drop_empty: bool = False) -> list[Open]: ...
def union(intervals: Iterable[Any], *, drop_empty: bool = False) -> list[Any]:
    """Sorted, disjoint union; touching intervals merge. ``drop_empty`` skips closed ones ending at
    or before their start."""
    out: list[Open] = []
    for start, end in sorted(intervals, key=lambda iv: iv[0]):
        if drop_empty and end is not None and end <= start:
            continue
        if out:
            last_start, last_end = out[-1]
            if last_end is None:
                break
            if start <= last_end:
                out[-1] = (last_start, None if end is None else max(last_end, end))
                continue
        out.append((start, end))
    return out


# ----------------------------------------------------------------------------------------------
# Which phase a running build is in, from its progress stream, as it happens (pure).
#
# :class:`LivePhases` is fed the parsed SolveStatus updates of one attempt and reports each phase
# *as it ends* (name, seconds on the worker's clock), so a Celery event can be sent per phase and
# the result backend can show the current phase while the build runs. These live figures are
# approximate (a phase is "current" from the first update that names it until another phase takes
# over); the result record's ``phases`` (computed from the whole stream by ``phases.py``) are the
# authoritative values.
Ended = tuple[str, float]


class LivePhases:
    """Current phase of one attempt; starts in ``launch`` at ``started_at``."""

    def __init__(self, clock: Callable[[], float], started_at: float) -> None:
        self._clock = clock
        self.current = "launch"
        self.since = started_at

    def _switch(self, phase: str) -> list[Ended]:
        if phase == self.current:
            return []
        now = self._clock()
        ended = [(self.current, max(0.0, now - self.since))]
        self.current, self.since = phase, now
        return ended

    def on_output(self, status: SolveStatus | None) -> list[Ended]:
        """Take one stderr line's parsed update (None for a text line); return the phases that ended."""
        # the first output ends ``launch``; a build always begins by loading its definition
        ended = self._switch("context") if self.current == "launch" else []
        if status is None:
            return ended
        phase = None
        for vertex in status.vertexes:
            if vertex.started is not None and vertex.completed is None:
                phase = classify(vertex.name)
        for st in status.statuses:
            if st.completed is None and is_push_status(st.id):
                phase = "push"
        if phase is not None:
            ended += self._switch(phase)
        return ended

    def finish(self) -> list[Ended]:
        """buildctl exited: the current phase ends now and ``finalize`` begins."""
        return self._switch("finalize")


# ----------------------------------------------------------------------------------------------
# Did the build import and export its registry cache? Decided from evidence, never from the job (pure).
#
# buildctl exits 0 when the cache export fails under ``ignore-error=true`` (the image is pushed
# first); only the ``exporting cache to registry`` vertex's ``error`` tells. So:
#
# * **exported** is true only when an export was asked for, every ``exporting cache to …`` vertex
#   completed without an error, and buildctl's ``--metadata-file`` has ``cache.manifest``;
#   otherwise false, with ``error``: the vertex's error, or why the evidence is missing when the
#   build succeeded without it (a build that ended before the export has no error here).
# * **imported** is true when an ``importing cache manifest from …`` vertex (one per
#   ``--import-cache`` ref) completed without an error. A cold cache's ``… not found`` is a miss
#   (false when no ref imported, no error); any other import error is kept in ``import_error``
#   (BuildKit goes on without the cache).
# * **export_outcome** (``exported`` | ``failed`` | ``skipped``, None when no export was asked
#   for) labels the ``buildq_cache_exports_total`` metric: ``skipped`` when the build ended before
#   the export started.
#: the end of a cold cache import's error: the cache does not exist yet (a miss)
MISS_SUFFIX = "not found"
NO_MANIFEST = "buildctl's metadata file has no cache.manifest"
NO_EXPORT = "the build's progress shows no cache export"


@dataclass(frozen=True, slots=True)
class CacheEvidence:
    """What the stream and the metadata file say about the registry cache of one build."""

    imported: bool
    import_error: str | None
    exported: bool
    error: str | None
    export_outcome: str | None


def is_miss(error: str) -> bool:
    """True for the import error of a cache that does not exist yet (a cold build)."""
    return error.rstrip().endswith(MISS_SUFFIX)


def cache_evidence(
    vertices: Iterable[VertexState],
    metadata: Mapping[str, Any] | None,
    *,
    export_requested: bool,
    succeeded: bool,
) -> CacheEvidence:
    """The cache report of a build from its vertices and its metadata file (None when absent)."""
    imports = []
    exports = []
    for v in vertices:
        phase = classify(v.name)
        if phase == "cache_import":
            imports.append(v)
        elif phase == "cache_export":
            exports.append(v)
    import_errors = [v.error for v in imports if v.error]
    # one ref imported is enough: a scoped build's own ref is a miss until its first export, and
    # its fallback's import then brings the cache (buildctl shows one vertex per --import-cache)
    imported = any(v.completed is not None and not v.error for v in imports)
    import_error = next((e for e in import_errors if not is_miss(e)), None)
    if not export_requested:
        return CacheEvidence(imported, import_error, False, None, None)
    export_error = next((v.error for v in exports if v.error), None)
    manifest = bool(metadata and metadata.get("cache.manifest"))
    complete = bool(exports) and all(v.completed is not None for v in exports)
    exported = complete and export_error is None and manifest
    error = export_error
    if not exported and error is None and succeeded:
        error = NO_MANIFEST if complete else NO_EXPORT
    if exported:
        outcome = "exported"
    elif exports or succeeded:
        outcome = "failed"
    else:
        outcome = "skipped"
    return CacheEvidence(imported, import_error, exported, error, outcome)
