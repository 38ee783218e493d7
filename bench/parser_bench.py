"""Throughput and peak memory of ProgressTracker on a long synthetic rawjson stream.

The stream imitates the captures in tests/fixtures/buildkit: [internal] loads with transfer statuses,
a cache import, Dockerfile steps that are announced, started, log base64 output, report progress
statuses and complete (some are restarted), then the image export with push statuses and the
cache export. Usage: ``.venv/bin/python bench/parser_bench.py [--lines 500000] [--steps 60]``.
Memory is measured with tracemalloc after the stream is built, so it counts the tracker (and the
transient parse objects), not the input.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buildq.buildkit.phases import compute_phases, slowest_steps, step_stats  # noqa: E402
from buildq.buildkit.progress import ProgressTracker  # noqa: E402

T0 = datetime(2026, 11, 28, 5, 0, 0, tzinfo=UTC).timestamp()


def stamp(t: float) -> str:
    whole = int(t)
    frac = int(round((t - whole) * 1e9))
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def vertex(d: str, name: str, **times: float | bool | list[str]) -> dict[str, object]:
    out: dict[str, object] = {"digest": d, "name": name}
    for k, v in times.items():
        out[k] = stamp(v) if isinstance(v, float) else v
    return out


def build_stream(lines: int, steps: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    t = T0

    def tick(dt: float = 1e-4) -> float:
        nonlocal t
        t += dt
        return t

    def emit(**obj: object) -> None:
        out.append(json.dumps(obj, separators=(",", ":")))

    for i, name in enumerate(
        ["[internal] load build definition from Dockerfile", "[internal] load .dockerignore"]
    ):
        d = digest(i + 1)
        emit(vertexes=[vertex(d, name)])
        s = tick()
        emit(vertexes=[vertex(d, name, started=s, completed=tick()), vertex(d, name, started=tick())])
        st = tick()
        for cur in (0, 29, 121):
            status = {"id": "transferring:", "vertex": d, "current": cur, "started": stamp(st)}
            status["timestamp"] = stamp(tick())
            emit(statuses=[status])
        emit(vertexes=[vertex(d, name, started=s, completed=tick())])
    step_names = [f"[stage-{k // 10} {k % 10 + 1}/10] RUN make part-{k}" for k in range(steps)]
    ctx, imp = digest(10), digest(11)
    imp_name = "importing cache manifest from 127.0.0.1:5000/demo/app:buildcache"
    announce = [vertex(digest(100 + k), n, inputs=[ctx]) for k, n in enumerate(step_names)]
    emit(
        vertexes=[
            *announce,
            vertex(ctx, "[internal] load build context"),
            vertex(imp, imp_name, started=tick()),
        ]
    )
    emit(vertexes=[vertex(imp, imp_name, started=t - 1e-4, completed=tick(0.01))])
    reserve = 40  # lines kept for the export part
    per_step = max(4, (lines - len(out) - reserve) // steps)
    payloads = [base64.b64encode(rng.randbytes(rng.randint(40, 600))).decode() for _ in range(64)]
    for k, name in enumerate(step_names):
        d = digest(100 + k)
        s = tick(0.001)
        emit(vertexes=[vertex(d, name, started=s, inputs=[ctx])])
        for j in range(per_step - 2):
            if j % 50 == 49:
                sid = f"extracting {k}-{j % 7}"
                status = {"id": sid, "vertex": d, "current": j, "total": per_step, "timestamp": stamp(tick())}
                emit(statuses=[status])
            elif k % 5 == 0 and j == per_step // 2:  # a restarted vertex, like the captures' loads
                first, done, s = s, tick(), tick(0.001)
                emit(vertexes=[vertex(d, name, started=first, completed=done), vertex(d, name, started=s)])
            else:
                emit(logs=[{"vertex": d, "stream": 1, "data": payloads[j % 64], "timestamp": stamp(tick())}])
        emit(vertexes=[vertex(d, name, started=s, completed=tick(0.002), inputs=[ctx])])
    exp, cache = digest(20), digest(21)
    s = tick()
    emit(vertexes=[vertex(exp, "exporting to image", started=s)])
    for sid in ("exporting layers", "pushing layers", "pushing manifest for 127.0.0.1:5000/demo/app:1"):
        st = tick()
        emit(statuses=[{"id": sid, "vertex": exp, "started": stamp(st), "timestamp": stamp(tick(0.01))}])
        emit(statuses=[{"id": sid, "vertex": exp, "started": stamp(st), "completed": stamp(tick(0.01))}])
    emit(vertexes=[vertex(exp, "exporting to image", started=s, completed=tick())])
    s = tick()
    emit(vertexes=[vertex(cache, "exporting cache to registry", started=s)])
    while len(out) < lines - 2:
        emit(
            statuses=[
                {"id": "writing layer", "vertex": cache, "started": stamp(s), "timestamp": stamp(tick())}
            ]
        )
    emit(vertexes=[vertex(cache, "exporting cache to registry", started=s, completed=tick())])
    out.append("error: failed to solve: synthetic trailing text line")
    return out


def run(stream: list[str]) -> ProgressTracker:
    tracker = ProgressTracker(clock=lambda: 1000.0)
    feed = tracker.feed
    for line in stream:
        feed(line)
    return tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=500_000)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    stream = build_stream(args.lines, args.steps)
    size = sum(len(line) + 1 for line in stream)
    print(f"stream: {len(stream):,} lines, {size / 2**20:.1f} MiB, {args.steps} steps")

    start = time.perf_counter()
    tracker = run(stream)
    elapsed = time.perf_counter() - start
    rate = f"{len(stream) / elapsed:,.0f} lines/s, {size / 2**20 / elapsed:.1f} MiB/s"
    print(f"throughput: {rate} ({elapsed:.2f} s)")

    for part in (stream[: len(stream) // 10], stream):
        tracemalloc.start()
        tracker = run(part)
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        kib = f"peak {peak / 1024:,.0f} KiB, retained {current / 1024:,.0f} KiB"
        print(f"memory (tracemalloc) after {len(part):,} lines: {kib}")
    runs = max(len(v.runs) for v in tracker.vertices.values())
    statuses = sum(len(v.statuses) for v in tracker.vertices.values())
    print(f"table: {len(tracker.vertices)} vertices, {statuses} statuses, max {runs} runs per vertex")
    span = (tracker.last_timestamp or 0.0) - (tracker.first_timestamp or 0.0)
    phases = compute_phases(
        tracker,
        enqueued_at=990.0,
        started_at=999.0,
        first_output_at=1000.0,
        exited_at=1000 + span,
        stored_at=1001 + span,
    )
    print("phases:", {k: v for k, v in phases.items() if v})
    print("steps:", step_stats(tracker), "slowest:", slowest_steps(tracker, 1))


if __name__ == "__main__":
    main()
