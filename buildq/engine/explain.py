"""Whether a finished build was unusually slow, against the recent builds of its repository (pure).

A *baseline* is a list of entries, one per earlier build of the same cache key
(:func:`~buildq.contract.job.cache_key`) that succeeded in a single attempt, newest first, as
:func:`baseline_entry` makes them: ``{"p": {phase: seconds}, "s": {step name: seconds}}`` with the
phases of :data:`~buildq.buildkit.phases.PHASES` and the build's slowest Dockerfile steps (the
record's ``slowest_steps``, at most 5).

:func:`explain` compares one build with its baseline. A phase, or one of the build's slowest steps,
is *flagged* when it took at least :data:`RATIO` times its median over the baseline **and** at
least :data:`MIN_EXCESS_S` seconds more than that median. Phases are compared only when the
baseline holds at least :data:`MIN_BUILDS` builds (otherwise the record says so), a step only when
at least that many of them list it. A build none of whose phases or steps took
:data:`MIN_EXCESS_S` cannot be flagged whatever its baseline, so the baseline need not be read
(:func:`needs_baseline`).

The record's ``explain``::

    {"key": "registry:5000/team/app:buildcache", "builds": 50,
     "flagged": [{"phase": "cache_import", "seconds": 31.2, "median": 0.4, "ratio": 78.0, "builds": 50}],
     "summary": "cache_import 31.2 s, 78× its median of 0.4 s over the last 50 builds"}

A flagged step has ``"phase": "step"`` and ``"step": "<name>"``; ``ratio`` is null when the median
is 0; ``builds`` is null when the baseline was not read.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from ..buildkit.phases import PHASES

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
        out["summary"] = "; ".join(sentence(f) for f in flagged)
    else:
        out["summary"] = f"nothing unusual against the last {n} builds"
    return out


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
