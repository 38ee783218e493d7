"""explain: a build's phases against its repository's baseline, over data and replayed genuine captures.

The baselines are built from the genuine rawjson captures (cold, warm, registry-warm builds of
the same project) replayed through ``ProgressTracker`` and ``compute_phases``; a slow build is the
same capture with one moment of the stream stretched (every timestamp after it moved later, as a
daemon that stalls there would report it).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit.phases import compute_phases, slowest_steps
from buildq.buildkit.progress import ProgressTracker
from buildq.contract.job import cache_key, parse_job
from buildq.contract.record import sentence
from buildq.engine import recording
from buildq.engine.recording import (
    MIN_BUILDS,
    STEP_NAME_MAX,
    baseline_entry,
    is_slow,
    needs_baseline,
    parse_entries,
)
from buildq.engine.runner import Outcome
from tests.standin.standin_replay import line_times, parse_rfc3339_ns, shift_line

BUILDS = Path(__file__).parent / "fixtures" / "buildkit" / "builds"
KEY = "127.0.0.1:5000/demo/app:buildcache"
F = 80_000.0  # worker clock when the first line arrives


def capture(variant: str) -> list[str]:
    return (BUILDS / f"ctx_oci_rawjson_{variant}.stderr").read_text().splitlines()


def stretch(lines: list[str], at_ns: int, seconds: float) -> list[str]:
    """The stream as if the daemon had stalled for ``seconds`` at ``at_ns``: later times move on."""
    return [shift_line(line, 0, [(at_ns, int(seconds * 1e9))]) for line in lines]


def vertex_completed(lines: list[str], prefix: str) -> int:
    """The (last) completion time of the vertex whose name starts with ``prefix``, in ns."""
    found = [
        parse_rfc3339_ns(v["completed"])
        for line in lines
        for v in json.loads(line).get("vertexes") or []
        if v["name"].startswith(prefix) and "completed" in v
    ]
    return max(found)


def status_completed(lines: list[str], prefix: str) -> int:
    found = [
        parse_rfc3339_ns(s["completed"])
        for line in lines
        for s in json.loads(line).get("statuses") or []
        if s["id"].startswith(prefix) and "completed" in s
    ]
    return max(found)


def build(lines: list[str], rnd: random.Random | None = None) -> dict[str, Any]:
    """The record parts explain needs of one replayed build (queue, launch and finalize jittered)."""
    rnd = rnd or random.Random(0)
    tracker = ProgressTracker(clock=lambda: F)
    for line in lines:
        tracker.feed(line)
    assert tracker.first_timestamp is not None and tracker.last_timestamp is not None
    exited = F + (tracker.last_timestamp - tracker.first_timestamp) + rnd.uniform(0.005, 0.03)
    phases = compute_phases(
        tracker,
        enqueued_at=F - rnd.uniform(0.03, 0.2),
        started_at=F - rnd.uniform(0.02, 0.05),
        first_output_at=F,
        exited_at=exited,
        stored_at=exited + rnd.uniform(0.001, 0.004),
    )
    return {"state": "succeeded", "attempts": [{}], "phases": phases, "slowest_steps": slowest_steps(tracker)}


def baseline_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries as the store keeps them (JSON, newest first) of these earlier builds."""
    items = [json.dumps(baseline_entry(r)).encode() for r in reversed(records)]
    return parse_entries(items)


def usual_builds(n: int = 12, seed: int = 1) -> list[dict[str, Any]]:
    """A repository's recent builds: mostly registry-warm and warm, now and then cold."""
    rnd = random.Random(seed)
    variants = ["regwarm", "warm", "regwarm", "cold", "warm", "regwarm"]
    return [build(capture(variants[i % len(variants)]), rnd) for i in range(n)]


def explain(
    phases: Any, steps: list[dict[str, Any]], baseline: list[dict[str, Any]] | None, *, key: str
) -> dict[str, Any] | None:
    """:func:`recording.explain` with its summary worded as every reader sees it (the flags'
    sentences are put together when the record is validated, as
    :func:`buildq.contract.record.validated_record` does)."""
    out = recording.explain(phases, steps, baseline, key=key)
    if out is not None and out["flagged"]:
        assert out["summary"] == ""  # worded from the flags, once, by the record's validation
        out["summary"] = "; ".join(sentence(flag) for flag in out["flagged"])
    return out


def run(record: dict[str, Any], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    out = explain(record["phases"], record["slowest_steps"], baseline, key=KEY)
    assert out is not None
    return out


def median_of(records: list[dict[str, Any]], phase: str) -> float:
    return round(statistics.median(r["phases"][phase] for r in records), 3)


# -- replayed genuine captures -------------------------------------------------------------------


def test_a_slow_cache_import_is_flagged_with_its_median() -> None:
    earlier = usual_builds()
    lines = capture("regwarm")
    completed = vertex_completed(lines, "importing cache manifest from ")
    slow = build(stretch(lines, completed - 1, 31.0))  # the import stalls just before it completes
    assert 31.0 < slow["phases"]["cache_import"] < 31.1
    out = run(slow, baseline_of(earlier))
    assert [f["phase"] for f in out["flagged"]] == ["cache_import"]
    flag = out["flagged"][0]
    median = median_of(earlier, "cache_import")
    assert flag == {
        "phase": "cache_import",
        "seconds": slow["phases"]["cache_import"],
        "median": median,
        "ratio": round(slow["phases"]["cache_import"] / median, 1),
        "builds": 12,
    }
    assert out["builds"] == 12 and out["key"] == KEY
    assert out["summary"] == (
        f"cache_import {slow['phases']['cache_import']:.1f} s, {flag['ratio']:.0f}× its median of "
        f"{median:.3f} s over the last 12 builds"
    )


def test_a_slow_push_is_flagged() -> None:
    earlier = usual_builds()
    lines = capture("cold")
    completed = status_completed(lines, "pushing layers")
    slow = build(stretch(lines, completed - 1, 6.0))
    assert 6.0 < slow["phases"]["push"] < 6.2
    out = run(slow, baseline_of(earlier))
    assert [f["phase"] for f in out["flagged"]] == ["push"]
    assert out["flagged"][0]["median"] == median_of(earlier, "push")
    assert out["summary"].startswith(f"push {slow['phases']['push']:.1f} s, ")
    assert out["summary"].endswith(
        f"its median of {median_of(earlier, 'push'):.3f} s over the last 12 builds"
    )


def test_a_slow_step_is_flagged_with_the_build_phase() -> None:
    earlier = usual_builds()
    lines = capture("cold")
    step = "[2/2] COPY app/ /app/"
    slow = build(stretch(lines, vertex_completed(lines, step) - 1, 10.0))
    out = run(slow, baseline_of(earlier))
    by_phase = {f["phase"]: f for f in out["flagged"]}
    assert set(by_phase) == {"build", "step"}
    flagged_step = by_phase["step"]
    assert flagged_step["step"] == step
    assert 10.0 < flagged_step["seconds"] < 10.2
    values = [s["seconds"] for r in earlier for s in r["slowest_steps"] if s["name"] == step]
    assert flagged_step["median"] == round(statistics.median(values), 3)
    assert flagged_step["builds"] == len(values) == 12
    assert f'step "{step}" {flagged_step["seconds"]:.1f} s' in out["summary"]
    assert out["summary"].count("; ") == 1  # two sentences: the build phase and its step


@pytest.mark.parametrize("variant", ["cold", "warm", "regwarm"])
def test_a_usual_build_is_not_flagged(variant: str) -> None:
    out = run(build(capture(variant), random.Random(7)), baseline_of(usual_builds()))
    assert out["flagged"] == []
    # nothing took 2 s: nothing could be flagged, whatever the baseline (so it is not even read)
    assert out["builds"] is None
    assert out["summary"] == "nothing unusual: no phase or step took 2 s or more"


def test_a_repository_whose_cache_import_usually_takes_seconds() -> None:
    """Long phases are compared, and flagged only when far from their usual time."""
    lines = capture("regwarm")
    at = vertex_completed(lines, "importing cache manifest from ") - 1
    rnd = random.Random(3)
    earlier = [build(stretch(lines, at, rnd.uniform(2.5, 3.5)), rnd) for _ in range(20)]
    baseline = baseline_of(earlier)
    usual = run(build(stretch(lines, at, 3.4)), baseline)
    assert usual["flagged"] == [] and usual["builds"] == 20
    assert usual["summary"] == "nothing unusual against the last 20 builds"
    # twice the usual: 3 s more, but not 3× (not flagged); 10×: flagged
    assert run(build(stretch(lines, at, 6.0)), baseline)["flagged"] == []
    slow = run(build(stretch(lines, at, 31.0)), baseline)
    assert [f["phase"] for f in slow["flagged"]] == ["cache_import"]
    assert 9.0 < slow["flagged"][0]["ratio"] < 11.0


def test_too_few_earlier_builds_say_so_instead_of_guessing() -> None:
    lines = capture("regwarm")
    slow = build(stretch(lines, vertex_completed(lines, "importing cache manifest from ") - 1, 31.0))
    out = run(slow, baseline_of(usual_builds(MIN_BUILDS - 1)))
    assert out["flagged"] == [] and out["builds"] == 4
    assert out["summary"] == f"not compared: 4 earlier builds of {KEY} on record, 5 needed"
    one = run(slow, baseline_of(usual_builds(1)))
    assert one["summary"] == f"not compared: 1 earlier build of {KEY} on record, 5 needed"
    assert run(slow, [])["summary"] == f"not compared: 0 earlier builds of {KEY} on record, 5 needed"
    assert [f["phase"] for f in run(slow, baseline_of(usual_builds(MIN_BUILDS)))["flagged"]] == [
        "cache_import"
    ]


def test_the_stored_record_carries_the_worded_explanation() -> None:
    """Through :func:`recording.conclude` (what the lifecycle stores): the baseline is read only
    because a phase took 2 s or more, and the summary is the flags' sentences."""
    job = parse_job({"job_id": "ex1", "context": "/srv/app", "tags": ["127.0.0.1:5000/demo/app:1"]})
    lines = capture("regwarm")
    slow = stretch(lines, vertex_completed(lines, "importing cache manifest from ") - 1, 31.0)
    tracker = ProgressTracker(clock=lambda: F)
    for line in slow:
        tracker.feed(line)
    assert tracker.first_timestamp is not None and tracker.last_timestamp is not None
    exited = F + (tracker.last_timestamp - tracker.first_timestamp) + 0.01
    outcome = Outcome(1, "tcp://bk:1", F - 0.03, exited, "succeeded", 0, None,
                      {"containerimage.digest": "sha256:" + "c" * 64}, tracker)  # fmt: skip
    raw = [json.dumps(baseline_entry(r)).encode() for r in reversed(usual_builds())]
    reads: list[int] = []

    def baseline() -> list[bytes]:
        reads.append(1)
        return raw

    concluded = recording.conclude(
        job, outcome, [], offset=0.0, window_start=F - 0.1, window_end=exited + 0.002, state="succeeded",
        enqueued_at=F - 0.1, baseline=baseline, cache_key=cache_key(job),
    )  # fmt: skip
    assert concluded.record is not None and reads == [1]
    out = concluded.record["explain"]
    assert out["key"] == cache_key(job) == KEY and out["builds"] == 12
    assert [f["phase"] for f in out["flagged"]] == ["cache_import"]
    assert out["summary"] == sentence(out["flagged"][0]) and out["summary"].startswith("cache_import 31.")
    assert json.loads(concluded.record_json or "{}")["explain"]["summary"] == out["summary"]
    assert concluded.baseline_entry is not None  # a success in one attempt joins the baseline


# -- the rule over data ----------------------------------------------------------------------------


def phases_with(**values: float) -> dict[str, float]:
    base = {
        "queued": 0.01,
        "launch": 0.03,
        "context": 0.1,
        "cache_import": 0.4,
        "build": 0.5,
        "export_image": 0.2,
        "push": 0.3,
        "cache_export": 0.1,
        "finalize": 0.002,
        "other": 0.01,
    }
    base.update(values)
    base["total"] = round(sum(base.values()), 3)
    return base


def entries(n: int, steps: dict[str, float] | None = None, **values: float) -> list[dict[str, Any]]:
    return [{"p": phases_with(**values), "s": dict(steps or {})} for _ in range(n)]


def test_the_issues_example_sentence() -> None:
    baseline = entries(25, cache_import=0.3) + entries(25, cache_import=0.5)  # median 0.4
    out = explain(phases_with(cache_import=31.2), [], baseline, key=KEY)
    assert out is not None
    assert out["summary"] == "cache_import 31.2 s, 78× its median of 0.4 s over the last 50 builds"
    assert out["flagged"] == [
        {"phase": "cache_import", "seconds": 31.2, "median": 0.4, "ratio": 78.0, "builds": 50}
    ]


@pytest.mark.parametrize(
    ("seconds", "median", "slow"),
    [
        (3.0, 1.0, True),  # exactly 3× and exactly 2 s above
        (2.999, 1.0, False),  # 2 s above is not reached
        (6.0, 2.0, True),
        (5.9, 2.0, False),  # 3.9 s above, but 2.95×
        (1.2, 0.4, False),  # 3×, only 0.8 s above
        (2.0, 0.0, True),
        (1.999, 0.0, False),
        (300.0, 120.0, False),  # 180 s above, 2.5×
    ],
)
def test_the_rule(seconds: float, median: float, slow: bool) -> None:
    assert is_slow(seconds, median) is slow
    baseline = entries(MIN_BUILDS, push=median)
    out = explain(phases_with(push=seconds), [], baseline, key=KEY)
    assert out is not None
    assert [f["phase"] for f in out["flagged"]] == (["push"] if slow else [])


def test_a_median_of_zero_has_no_ratio() -> None:
    out = explain(phases_with(push=2.5), [], entries(5, push=0.0), key=KEY)
    assert out is not None
    assert out["flagged"][0]["ratio"] is None
    assert out["summary"] == "push 2.5 s against a median of 0 s over the last 5 builds"


def test_several_flags_biggest_first_and_sentences() -> None:
    phases = phases_with(queued=40.0, push=5.0, build=3.0, context=2.5)
    out = explain(phases, [], entries(8, queued=0.5, build=0.9, context=1.0), key=KEY)
    assert out is not None
    # by seconds above the median; context (2.5×) is not flagged
    assert [f["phase"] for f in out["flagged"]] == ["queued", "push", "build"]
    assert out["summary"] == (
        "queued 40.0 s, 80× its median of 0.5 s over the last 8 builds; "
        "push 5.0 s, 17× its median of 0.3 s over the last 8 builds; "
        "build 3.0 s, 3.3× its median of 0.9 s over the last 8 builds"
    )
    assert sentence({"phase": "push", "seconds": 0.05, "median": 0.017, "ratio": 2.9, "builds": 8}) == (
        "push 0.050 s, 2.9× its median of 0.017 s over the last 8 builds"
    )


def test_steps_need_their_own_five_builds() -> None:
    step = "[3/4] RUN make"
    steps = [{"name": step, "seconds": 30.0, "cached": False}]
    with_step = entries(4, steps={step: 0.5}) + entries(6)
    out = explain(phases_with(build=0.5), steps, with_step, key=KEY)
    assert out is not None and out["flagged"] == [] and out["builds"] == 10
    out = explain(phases_with(build=0.5), steps, entries(5, steps={step: 0.5}), key=KEY)
    assert out is not None
    assert out["flagged"] == [
        {"phase": "step", "step": step, "seconds": 30.0, "median": 0.5, "ratio": 60.0, "builds": 5}
    ]
    assert out["summary"] == f'step "{step}" 30.0 s, 60× its median of 0.5 s over the last 5 builds'


def test_needs_baseline_only_from_two_seconds() -> None:
    assert not needs_baseline(phases_with(), [])
    assert needs_baseline(phases_with(context=2.0), [])
    assert needs_baseline(phases_with(), [{"name": "[1/1] RUN x", "seconds": 2.0, "cached": False}])
    assert not needs_baseline({"total": 50.0}, [])  # total is no phase


def test_baseline_entries_come_from_builds_that_succeeded_at_once() -> None:
    long_name = "[2/2] RUN " + "x" * 500
    record = {
        "state": "succeeded",
        "attempts": [{}],
        "phases": phases_with(),
        "slowest_steps": [{"name": long_name, "seconds": 1.5, "cached": False}],
    }
    entry = baseline_entry(record)
    assert entry is not None
    assert "total" not in entry["p"] and entry["p"]["cache_import"] == 0.4
    assert entry["s"] == {long_name[:STEP_NAME_MAX]: 1.5}
    assert baseline_entry({**record, "state": "failed"}) is None
    assert baseline_entry({**record, "attempts": [{}, {}]}) is None  # retried: not a usual build
    assert baseline_entry({**record, "phases": None}) is None
    # a long step name is compared by the same cut
    baseline = [entry] * 5
    slow = [{"name": long_name, "seconds": 9.0, "cached": False}]
    out = explain(phases_with(), slow, baseline, key=KEY)
    assert out is not None and out["flagged"][0]["step"] == long_name[:STEP_NAME_MAX]


def test_no_phases_no_explanation_and_corrupt_entries_are_skipped() -> None:
    assert explain(None, [], None, key=KEY) is None
    good = json.dumps({"p": {"push": 0.1}, "s": {}}).encode()
    assert parse_entries([good, b"{not json", b"[1]", good]) == [{"p": {"push": 0.1}, "s": {}}] * 2
    assert parse_entries([]) == []


def test_stretch_moves_only_later_times() -> None:
    lines = capture("regwarm")
    at = vertex_completed(lines, "importing cache manifest from ") - 1
    moved = stretch(lines, at, 1.0)
    before = [t for line in lines for t in line_times(line)]
    after = [t for line in moved for t in line_times(line)]
    assert [b - a for a, b in zip(before, after, strict=True)] == [
        (1_000_000_000 if a > at else 0) for a in before
    ]
