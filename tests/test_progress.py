"""ProgressTracker: merging by digest and status id, runs, log/warning counters, text lines, bounds."""

from __future__ import annotations

import base64
import itertools
import json
from collections import deque
from datetime import datetime
from pathlib import Path

import pytest

from buildq.buildkit.progress import (
    MAX_RUNS,
    TEXT_LINES_KEPT,
    ProgressTracker,
    add_run,
    base64_decoded_len,
    normalize_runs,
)

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
CAPTURES = sorted(
    [
        *FIXTURES.glob("builds/ctx_*_rawjson_*.stderr"),
        *FIXTURES.glob("extra/*.trace.json"),
        FIXTURES / "errors" / "err_vi_registry_down_rawjson.stderr",
    ]
)
ERROR_CAPTURES = sorted(FIXTURES.glob("errors/*_rawjson.stderr"))


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def json_objects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def replay(path: Path, clock=lambda: 0.0) -> ProgressTracker:
    tracker = ProgressTracker(clock=clock)
    with path.open() as fh:
        for line in fh:
            tracker.feed(line)
    return tracker


def test_captures_are_present() -> None:
    assert len(CAPTURES) == 18
    assert all(p.is_file() for p in CAPTURES)


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_vertices_merged_by_digest(path: Path) -> None:
    expected: dict[str, dict] = {}
    for obj in json_objects(path):
        for v in obj.get("vertexes") or []:
            e = expected.setdefault(
                v["digest"], {"name": "", "started": [], "completed": [], "cached": False}
            )
            e["name"] = v.get("name") or e["name"]
            e["cached"] = e["cached"] or bool(v.get("cached"))
            e["started"] += [ts(v["started"])] if "started" in v else []
            e["completed"] += [ts(v["completed"])] if "completed" in v else []
    tracker = replay(path)
    vertices = {d: v for d, v in tracker.vertices.items() if v.name}  # log-only vertices have no name
    assert set(vertices) == set(expected)
    for digest, e in expected.items():
        v = tracker.vertices[digest]
        assert v.name == e["name"]
        assert v.cached == e["cached"]
        assert v.started == min(e["started"], default=None)
        assert v.completed == max(e["completed"], default=None)
        assert len(v.runs) <= MAX_RUNS
        assert all(end is not None and start <= end for start, end in v.runs), "every run completed"


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_first_and_last_timestamp(path: Path) -> None:
    stamps_per_line = []
    for obj in json_objects(path):
        found = []
        for key in ("vertexes", "statuses", "logs"):
            for item in obj.get(key) or []:
                found += [ts(item[k]) for k in ("started", "completed", "timestamp") if k in item]
        if found:
            stamps_per_line.append(found)
    tracker = replay(path)
    assert tracker.first_timestamp == min(stamps_per_line[0])
    assert tracker.last_timestamp == max(itertools.chain.from_iterable(stamps_per_line))


def test_restarted_vertex_keeps_both_runs() -> None:
    tracker = replay(FIXTURES / "builds" / "ctx_default_rawjson_cold.stderr")
    (definition,) = [
        v for v in tracker.vertices.values() if v.name.endswith("build definition from Dockerfile")
    ]
    assert definition.runs == [
        (ts("2026-11-28T05:22:32.729095983Z"), ts("2026-11-28T05:22:32.729136363Z")),
        (ts("2026-11-28T05:22:32.729230263Z"), ts("2026-11-28T05:22:32.74027574Z")),
    ]
    assert definition.started == ts("2026-11-28T05:22:32.729095983Z")
    assert definition.completed == ts("2026-11-28T05:22:32.74027574Z")


def test_statuses_merged_by_id_per_vertex() -> None:
    tracker = replay(FIXTURES / "builds" / "ctx_default_rawjson_cold.stderr")
    by_name = {v.name: v for v in tracker.vertices.values()}
    context = by_name["[internal] load build context"].statuses["transferring context:"]
    ignore = by_name["[internal] load .dockerignore"].statuses["transferring context:"]
    assert (context.current, ignore.current) == (8591061, 2)  # same id, different vertices
    assert context.started == ts("2026-11-28T05:22:32.786858907Z")
    assert context.completed == ts("2026-11-28T05:22:32.889631572Z")
    export = by_name["exporting to image"].statuses
    assert "pushing layers" in export and len(export) == 5
    assert all(s.completed is not None for s in export.values())


def test_log_bytes_counted_not_kept() -> None:
    path = FIXTURES / "extra" / "extra_cachemetrics_trace_cold.trace.json"
    expected: dict[str, int] = {}
    for obj in json_objects(path):
        for log in obj.get("logs") or []:
            expected[log["vertex"]] = expected.get(log["vertex"], 0) + len(base64.b64decode(log["data"]))
    tracker = replay(path)
    assert expected and {d: tracker.vertices[d].log_bytes for d in expected} == expected
    assert all(v.log_chunks == 2 for d, v in tracker.vertices.items() if d in expected)


@pytest.mark.parametrize("n", range(12))
def test_base64_decoded_len(n: int) -> None:
    data = base64.b64encode(bytes(range(n))).decode()
    assert base64_decoded_len(data) == n


def test_warnings_counted() -> None:
    line = json.dumps({"warnings": [{"vertex": "sha256:a", "level": 1, "short": "eA=="}] * 3})
    tracker = ProgressTracker()
    tracker.feed(line)
    assert tracker.warnings == 3 and tracker.vertices["sha256:a"].warnings == 3


def test_cache_import_error_vertex_is_kept_and_build_not_failed() -> None:
    tracker = replay(FIXTURES / "builds" / "ctx_oci_rawjson_cold.stderr")
    (imp,) = [v for v in tracker.vertices.values() if v.name.startswith("importing cache manifest")]
    assert imp.error is not None and imp.error.startswith("failed to configure registry cache importer")
    assert imp.runs and imp.runs[0][1] is not None
    assert tracker.error_line is None


@pytest.mark.parametrize("path", ERROR_CAPTURES, ids=lambda p: p.name)
def test_error_line_is_last_error_line(path: Path) -> None:
    last = path.read_text().splitlines()[-1]
    assert last.startswith("error: ")
    tracker = replay(path)
    assert tracker.error_line == last.removeprefix("error: ")
    assert tracker.text_lines[-1] == last


def test_non_json_lines_tolerated() -> None:
    tracker = replay(FIXTURES / "errors" / "err_iv_syntax_rawjson.stderr")
    assert tracker.text_lines[0] == "Dockerfile:3"
    assert " 3 | >>> FROMM scratch" in tracker.text_lines[4]
    assert tracker.error_line is not None and "unknown instruction: FROMM" in tracker.error_line
    junk = ["{not json", "[1, 2]", "", "   ", '{"vertexes": 5}', '{"statuses":[{"current":"x"}]}', "\x00\xff"]
    for line in junk:
        tracker.feed(line)
    assert tracker.lines == 14 + len(junk)
    assert "{not json" in tracker.text_lines and "" not in tracker.text_lines


def test_text_lines_bounded_and_error_line_survives() -> None:
    tracker = ProgressTracker()
    tracker.feed("error: first")
    tracker.feed("error: second")
    for i in range(100):
        tracker.feed(f"time=... level=warning msg={i}")
    assert len(tracker.text_lines) == TEXT_LINES_KEPT
    assert tracker.text_lines[-1] == "time=... level=warning msg=99"
    assert tracker.error_line == "second"


def test_first_output_at_from_injected_clock() -> None:
    ticks = itertools.count(100.0, 0.5)
    tracker = ProgressTracker(clock=lambda: next(ticks))
    assert tracker.first_output_at is None
    replay_lines = (FIXTURES / "builds" / "ctx_oci_rawjson_warm.stderr").read_text().splitlines()
    for line in replay_lines:
        tracker.feed(line)
    assert tracker.first_output_at == 100.0
    assert tracker.last_output_at == 100.0 + 0.5 * (len(replay_lines) - 1)


def test_normalize_runs() -> None:
    assert normalize_runs([(5.0, 6.0), (1.0, 2.0), (1.5, 3.0), (3.0, 4.0)]) == [(1.0, 4.0), (5.0, 6.0)]
    assert normalize_runs([(1.0, None), (3.0, 4.0)]) == [(1.0, 4.0)]  # open run reaches the next one
    assert normalize_runs([(1.0, 2.0), (1.5, None)]) == [(1.0, 2.0)]  # completion at 2.0 is later news
    assert normalize_runs([(1.0, 2.0), (2.0, None)]) == [(1.0, None)]  # restarted right at completion
    assert normalize_runs([(1.0, None), (1.0, 2.0)]) == [(1.0, 2.0)]
    assert normalize_runs([(1.0, 2.0), (1.0, None)]) == [(1.0, 2.0)]
    runs = [(float(i), i + 0.5) for i in range(10)]
    runs[4] = (4.0, 4.9)  # smallest gap: 4.9 → 5.0
    out = normalize_runs(runs, limit=9)
    assert len(out) == 9 and (4.0, 5.5) in out


def test_add_run_matches_start() -> None:
    runs = add_run([], 1.0, None)
    runs = add_run(runs, 1.0, None)
    assert runs == [(1.0, None)]
    runs = add_run(runs, 1.0, 2.0)
    assert runs == [(1.0, 2.0)]
    runs = add_run(runs, 3.0, None)
    assert runs == [(1.0, 2.0), (3.0, None)]
    assert add_run(runs, 3.0, 4.0) == [(1.0, 2.0), (3.0, 4.0)]
    # the last completion repeats the first start although the vertex restarted: all runs closed
    assert add_run([(1.0, 2.0), (3.0, None)], 1.0, 5.0) == [(1.0, 5.0)]


def _synthetic(i: int) -> str:
    t = f"2026-01-01T00:{(i // 60000) % 60:02d}:{(i // 1000) % 60:02d}.{i % 1000:03d}000000Z"
    digest = f"sha256:{i % 4}"
    kind = i % 3
    if kind == 0:  # the vertex is (re)started and completed every time: runs must merge
        vertex = {"digest": digest, "name": f"[{i % 4 + 1}/4] RUN x", "started": t, "completed": t}
        return json.dumps({"vertexes": [vertex]})
    if kind == 1:
        status = {"id": f"s{i % 5}", "vertex": digest, "current": i, "timestamp": t, "started": t}
        return json.dumps({"statuses": [status]})
    return json.dumps({"logs": [{"vertex": digest, "stream": 1, "data": "aGVsbG8K", "timestamp": t}]})


def test_memory_bounded_by_vertices_not_stream() -> None:
    tracker = ProgressTracker(clock=lambda: 0.0)
    n = 200_000
    for i in range(n):
        tracker.feed(_synthetic(i))
        if i % 1000 == 999:
            tracker.feed("some plain text line")
    assert tracker.lines == n + n // 1000
    assert len(tracker.vertices) == 4
    assert all(len(v.runs) <= MAX_RUNS for v in tracker.vertices.values())
    assert max(len(v.statuses) for v in tracker.vertices.values()) <= 5
    assert len(tracker.text_lines) == TEXT_LINES_KEPT
    assert sum(v.log_bytes for v in tracker.vertices.values()) == 6 * len(range(2, n, 3))
    containers = {k: len(v) for k, v in vars(tracker).items() if isinstance(v, (list, dict, deque, set))}
    assert max(containers.values()) <= TEXT_LINES_KEPT, containers
