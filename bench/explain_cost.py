"""What ``explain`` and the baselines add to a build's exit → result path, measured in one process.

Run by hand (not part of the tests):
    .venv/bin/python bench/explain_cost.py [--redis URL] [--n 3000]

Redis: a ``redis-server`` of its own on a free port (tests/harness.py), unless ``--redis`` names one.

- every build: ``explain`` for a build without a phase of 2 s (the baseline is not read) and the
  baseline entry made and encoded (pool-process CPU per build);
- every build: ``finish`` with and without the baseline write in its script (the same round trip;
  wall time, alternating);
- a build with a phase of 2 s or more: the extra round trip reading a full baseline
  (``BUILDQ_BASELINE_N`` = 50 entries, five steps each) and ``explain`` over it.

Only keys made here are touched (a random prefix), and they are deleted at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buildq.store.claim import finish  # noqa: E402

from buildq.engine.recording import baseline_entry, explain, needs_baseline  # noqa: E402
from buildq.store.jobs import (  # noqa: E402
    JobStore,  # noqa: E402
    baseline_write,
    read_baseline,
)
from buildq.store.keys import baseline_key, job_key  # noqa: E402

PHASES = {
    "queued": 0.004,
    "launch": 0.031,
    "context": 0.112,
    "cache_import": 0.016,
    "build": 0.101,
    "export_image": 0.207,
    "push": 0.102,
    "cache_export": 0.019,
    "finalize": 0.003,
    "other": 0.012,
    "total": 0.607,
}
STEPS = [
    {"name": f"[{i}/5] RUN ./scripts/step-{i}.sh --with-some-arguments", "seconds": 0.1 * i, "cached": False}
    for i in range(1, 6)
]


def record(job_id: str, phases: dict[str, float]) -> dict:
    return {
        "job_id": job_id,
        "state": "succeeded",
        "attempts": [{}],
        "phases": phases,
        "slowest_steps": STEPS,
    }


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", help="a Redis URL (default: a redis-server of its own, on a free port)")
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    if args.redis is None:
        from tests.harness import REDIS_URL  # starts it; it stops when this process exits

        args.redis = f"{REDIS_URL}/15"
    client = redis.Redis.from_url(args.redis)
    store = JobStore(client, result_ttl_s=60)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    key = f"reg:5000/{prefix}/app:buildcache"
    made: list[str] = [baseline_key(key)]

    # 1. pool-process CPU per build: explain of a short build + its baseline entry
    rec = record("x", PHASES)
    t0 = time.process_time()
    for _ in range(args.n):
        assert not needs_baseline(rec["phases"], rec["slowest_steps"])
        rec["explain"] = explain(rec["phases"], rec["slowest_steps"], None, key=key)
        baseline_write(key, baseline_entry(rec), 50)
    cpu_us = (time.process_time() - t0) / args.n * 1e6

    # 2. finish with and without the baseline write (alternating), wall time per call
    finish(store, None, f"{prefix}-warm", "t", None, rec)
    made += [job_key(f"{prefix}-warm")]
    plain: list[float] = []
    with_write: list[float] = []
    for i in range(args.n):
        for write in (i % 2 == 0, i % 2 == 1):
            job_id = f"{prefix}-{i}-{int(write)}"
            made += [job_key(job_id)]
            write_args = baseline_write(key, baseline_entry(rec), 50) if write else None
            t = time.perf_counter()
            finish(store, None, job_id, "t", None, rec, baseline=write_args)
            (with_write if write else plain).append(time.perf_counter() - t)

    # 3. the read for a build with a phase of 2 s or more: 50 entries, then explain over them
    slow = record("slow", {**PHASES, "cache_import": 31.2})
    reads: list[float] = []
    for _ in range(args.n):
        t = time.perf_counter()
        baseline = read_baseline(client, key, 50)
        explain(slow["phases"], slow["slowest_steps"], baseline, key=key)
        reads.append(time.perf_counter() - t)
    size = client.memory_usage(baseline_key(key)) or 0
    assert len(baseline) == 50
    for i in range(0, len(made), 500):
        client.delete(*made[i : i + 500])

    print(f"explain + baseline entry, short build (no read): {cpu_us:.1f} µs CPU per build")
    for name, values in (
        ("finish without baseline write", plain),
        ("finish with baseline write", with_write),
    ):
        print(f"{name}: p50 {pct(values, 50) * 1e6:.0f} µs, p99 {pct(values, 99) * 1e6:.0f} µs")
    print(
        f"read 50 entries + explain (builds with a phase of 2 s or more): p50 {pct(reads, 50) * 1e6:.0f} µs, "
        f"p99 {pct(reads, 99) * 1e6:.0f} µs, mean {statistics.mean(reads) * 1e6:.0f} µs"
    )
    print(f"one baseline of 50 entries in Redis: {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
