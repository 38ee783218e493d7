"""Phases: replayed captures against durations computed here from the captures' own timestamps."""

from __future__ import annotations

import json
import random
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from buildq.buildkit.phases import (
    ALL_KEYS,
    PHASES,
    PRIORITY,
    STREAM_PHASES,
    apportion_ms,
    classify,
    compute_phases,
    is_step,
    slowest_steps,
    step_stats,
    stream_phases,
)
from buildq.buildkit.progress import ProgressTracker

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
CAPTURES = sorted(
    [
        *FIXTURES.glob("builds/ctx_*_rawjson_*.stderr"),
        *FIXTURES.glob("extra/*.trace.json"),
        FIXTURES / "errors" / "err_vi_registry_down_rawjson.stderr",
    ]
)
MS = 1e-3 + 1e-9
F = 50_000.0  # worker clock when the first line arrives


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def replay(lines: list[str]) -> ProgressTracker:
    tracker = ProgressTracker(clock=lambda: F)
    for line in lines:
        tracker.feed(line)
    return tracker


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def expected_stream(lines: list[str]) -> dict[str, float]:
    """Independent computation: per named vertex its runs, per phase the union, earlier PRIORITY wins."""
    names: dict[str, str] = {}
    runs: dict[str, dict[float, float]] = {}  # digest -> started -> completed
    pushes: dict[str, dict[str, tuple[float, float]]] = {}  # digest -> status id -> (started, completed)
    for line in lines:
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        for v in obj.get("vertexes") or []:
            names[v["digest"]] = v["name"]
            if "started" in v and "completed" in v:
                runs.setdefault(v["digest"], {})[ts(v["started"])] = ts(v["completed"])
        for s in obj.get("statuses") or []:
            if s["id"].startswith(("pushing layers", "pushing manifest for ")) and "completed" in s:
                pushes.setdefault(s["vertex"], {})[s["id"]] = (ts(s["started"]), ts(s["completed"]))
    intervals: dict[str, list[tuple[float, float]]] = {p: [] for p in STREAM_PHASES}
    for digest, name in names.items():
        if name.startswith("[internal] load "):
            phase = "context"
        elif name.startswith("importing cache manifest"):
            phase = "cache_import"
        elif name == "exporting to image":
            phase = "export_image"
        elif name == "exporting cache to registry":
            phase = "cache_export"
        else:
            phase = "build"
        intervals[phase] += list(runs.get(digest, {}).items())
        intervals["push"] += list(pushes.get(digest, {}).values())
    # Cut time into elementary segments; each goes to the first phase (in priority order) covering it.
    points = sorted({t for ivs in intervals.values() for iv in ivs for t in iv})
    out = {p: 0.0 for p in STREAM_PHASES}
    for a, b in zip(points, points[1:], strict=False):
        mid = (a + b) / 2
        for phase in PRIORITY:
            if any(s <= mid <= e for s, e in intervals[phase]):
                out[phase] += b - a
                break
    return out


def stream_span(lines: list[str]) -> float:
    tracker = replay(lines)
    assert tracker.first_timestamp is not None and tracker.last_timestamp is not None
    return tracker.last_timestamp - tracker.first_timestamp


def phases_for(lines: list[str], *, tail: float = 0.25, tracker: ProgressTracker | None = None) -> dict:
    tracker = tracker or replay(lines)
    exited = F + stream_span(lines) + tail
    return compute_phases(
        tracker,
        enqueued_at=F - 3.0,
        started_at=F - 1.0,
        first_output_at=F,
        exited_at=exited,
        stored_at=exited + 0.5,
    )


def assert_sum_rule(phases: dict[str, float]) -> None:
    assert set(phases) == set(ALL_KEYS)
    assert all(v >= 0 for v in phases.values()), phases
    assert all(abs(v * 1000 - round(v * 1000)) < 1e-6 for v in phases.values()), "ms resolution"
    assert round(sum(phases[k] for k in PHASES) * 1000) == round(phases["total"] * 1000)
    assert sum(phases[k] for k in PHASES) == pytest.approx(phases["total"], abs=1e-9)


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_capture_phases_match_vertex_timestamps(path: Path) -> None:
    lines = lines_of(path)
    phases = phases_for(lines)
    expected = expected_stream(lines)
    for name in STREAM_PHASES:
        assert phases[name] == pytest.approx(expected[name], abs=MS), name
    assert phases["queued"] == 2.0 and phases["launch"] == 1.0 and phases["finalize"] == 0.5
    assert phases["total"] == pytest.approx(3.0 + stream_span(lines) + 0.25 + 0.5, abs=MS)
    assert phases["other"] == pytest.approx(stream_span(lines) + 0.25 - sum(expected.values()), abs=2 * MS)
    assert_sum_rule(phases)
    assert phases["context"] > 0 and phases["cache_import"] > 0 and phases["export_image"] > 0
    assert phases["push"] > 0


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_clock_skew_does_not_change_phases(path: Path) -> None:
    lines = lines_of(path)

    def shift(m: re.Match[str]) -> str:
        return f'"{(datetime.fromisoformat(m[1]) + timedelta(hours=1)).isoformat()}{m[2] or ""}Z"'

    skewed = [re.sub(r'"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z"', shift, line) for line in lines]
    assert skewed != lines
    first, shifted = replay(lines).first_timestamp, replay(skewed).first_timestamp
    assert first is not None and shifted == pytest.approx(first + 3600)
    assert phases_for(skewed) == phases_for(lines)


def test_union_is_sum_of_stream_phases() -> None:
    tracker = replay(lines_of(FIXTURES / "extra" / "extra_cachemetrics_trace_cold.trace.json"))
    result = stream_phases(tracker, first_output_at=F, exited_at=F + 10)
    assert result.union == pytest.approx(sum(result.phases.values()), abs=1e-9)
    assert 3.9 < result.union < 3.98


def test_phases_clipped_to_stream_window() -> None:
    lines = lines_of(FIXTURES / "extra" / "extra_cachemetrics_trace_cold.trace.json")
    tracker = replay(lines)
    exited = F + 1.0  # buildctl exit seen 1 s after the first line although the stream spans ~4 s
    phases = compute_phases(
        tracker, enqueued_at=F, started_at=F, first_output_at=F, exited_at=exited, stored_at=F + 2
    )
    assert_sum_rule(phases)
    assert sum(phases[k] for k in STREAM_PHASES) + phases["other"] == pytest.approx(1.0, abs=MS)
    assert phases["export_image"] == phases["push"] == phases["cache_export"] == 0.0


def test_open_runs_end_at_exit() -> None:
    lines = lines_of(FIXTURES / "extra" / "extra_cachemetrics_trace_cold.trace.json")
    cut = 1 + next(
        i
        for i, line in enumerate(lines)
        if any("sleep 2" in v["name"] and "started" in v for v in json.loads(line).get("vertexes") or [])
    )
    tracker = replay(lines[:cut])  # stream stops while the `sleep 2` step runs (daemon killed)
    phases = compute_phases(
        tracker, enqueued_at=F, started_at=F, first_output_at=F, exited_at=F + 5, stored_at=F + 5
    )
    assert_sum_rule(phases)
    assert tracker.first_timestamp is not None
    running_since = ts("2026-11-28T05:27:03.685692782Z") - tracker.first_timestamp
    finished_steps = expected_stream(lines[:cut])["build"]  # the three [base] steps
    assert 0.1 < finished_steps < 0.2
    assert phases["build"] == pytest.approx(5 - running_since + finished_steps, abs=MS)
    assert phases["other"] < 0.05  # only the gaps between vertices before the step started


def test_skewed_enqueue_clock_and_no_output() -> None:
    tracker = ProgressTracker()
    phases = compute_phases(
        tracker, enqueued_at=F + 60, started_at=F, first_output_at=None, exited_at=F + 2, stored_at=F + 2.5
    )
    assert phases == dict.fromkeys(ALL_KEYS, 0.0) | {"launch": 2.0, "finalize": 0.5, "total": 2.5}


def test_each_attempt_gets_its_own_phases() -> None:
    attempts = [
        (FIXTURES / "errors" / "err_vi_registry_down_rawjson.stderr", 100.0),
        (FIXTURES / "builds" / "ctx_default_rawjson_regwarm.stderr", 200.0),
    ]
    results = []
    for path, t in attempts:
        clock = iter([t + 0.3] * 1000).__next__
        tracker = ProgressTracker(clock=clock)
        for line in lines_of(path):
            tracker.feed(line)
        exited = t + 0.3 + stream_span(lines_of(path))
        phases = compute_phases(
            tracker, enqueued_at=0.0, started_at=t, first_output_at=None, exited_at=exited, stored_at=exited
        )
        assert_sum_rule(phases)
        assert phases["launch"] == pytest.approx(0.3)
        results.append(phases)
    assert results[0]["queued"] == 100.0 and results[1]["queued"] == 200.0
    assert results[0]["cache_export"] == 0.0 and results[1]["cache_export"] > 0


def test_cache_import_error_vertex_in_cold_builds() -> None:
    for path in FIXTURES.glob("builds/ctx_*_rawjson_cold.stderr"):
        lines = lines_of(path)
        assert any("failed to configure registry cache importer" in line for line in lines)
        phases = phases_for(lines)
        assert_sum_rule(phases)
        assert phases["cache_import"] == pytest.approx(expected_stream(lines)["cache_import"], abs=MS)


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_step_stats_cold_vs_warm(path: Path) -> None:
    stats = step_stats(replay(lines_of(path)))
    steps = 7 if "extra" in path.name else 2
    # ocifalse never exported its cache (the export fails), so its regwarm run has nothing to import.
    if "_cold" in path.name or path.name == "ctx_ocifalse_rawjson_regwarm.stderr":
        assert stats == {"total": steps, "cached": 0, "executed": steps, "cache_hit_ratio": 0.0}
    else:  # warm, regwarm, and the registry-down run (daemon cache warm from earlier builds)
        assert stats == {"total": steps, "cached": steps, "executed": 0, "cache_hit_ratio": 1.0}


def test_slowest_step_is_the_sleep() -> None:
    tracker = replay(lines_of(FIXTURES / "extra" / "extra_cachemetrics_trace_cold.trace.json"))
    top = slowest_steps(tracker)
    assert len(top) == 5
    assert top[0]["name"].startswith('[build 1/2] RUN echo "building at $(date)" > /built.txt && sleep 2')
    expected = ts("2026-11-28T05:27:05.782391284Z") - ts("2026-11-28T05:27:03.685692782Z")
    assert top[0]["seconds"] == pytest.approx(expected, abs=MS) and 2.05 < expected < 2.15
    assert top[0]["cached"] is False
    seconds = [row["seconds"] for row in top]
    assert seconds == sorted(seconds, reverse=True)
    warm = slowest_steps(
        replay(lines_of(FIXTURES / "extra" / "extra_cachemetrics_trace_warm.trace.json")), n=10
    )
    assert len(warm) == 7 and all(row["cached"] and row["seconds"] < 0.001 for row in warm)


@pytest.mark.parametrize(
    ("name", "phase", "step"),
    [
        ("[internal] load build definition from Dockerfile", "context", False),
        ("[internal] load .dockerignore", "context", False),
        ("[internal] load metadata for docker.io/library/alpine:3.20", "context", False),
        ("importing cache manifest from 127.0.0.1:5000/demo/app:buildcache", "cache_import", False),
        ("[1/2] COPY hello.txt /hello.txt", "build", True),
        ("[stage-1 1/1] RUN make", "build", True),
        ("[base 3/3] RUN true", "build", True),
        ("[linux/amd64 2/3] RUN true", "build", True),
        ("[auth] library/alpine:pull token for registry-1.docker.io", "build", False),
        ("exporting to image", "export_image", False),
        ("exporting cache to registry", "cache_export", False),
    ],
)
def test_classify(name: str, phase: str, step: bool) -> None:
    assert classify(name) == phase
    assert is_step(name) is step


def test_apportion_ms_keeps_sum() -> None:
    rng = random.Random(7)
    for _ in range(500):
        values = {f"p{i}": rng.random() * rng.choice([0.001, 0.1, 10]) for i in range(10)}
        total = sum(values.values())
        out = apportion_ms(values, total)
        assert round(sum(out.values()) * 1000) == round(total * 1000)
        assert all(0 <= out[k] and abs(out[k] - values[k]) <= MS for k in values)
