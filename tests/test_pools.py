"""Pools and capacity: several daemons, each capped by a Redis lease semaphore (real workers)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

from tests.conftest import scenario
from tests.harness import ROOT, client_for


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_daemon_caps_hold_and_waiting_shows_as_queue_time(buildq_env, start_worker, context_dir, standin_log):
    env = {
        **buildq_env,
        "BUILDQ_BUILDKIT_HOSTS": "tcp://daemon-a:1234,tcp://daemon-b:1234",
        "BUILDQ_BUILDKIT_MAX_BUILDS": "1",
    }
    start_worker(env, concurrency=2)
    start_worker(env, concurrency=2)
    client = client_for(env)
    slow = scenario(kind="succeed", sleep_s=0.6)
    handles = [
        client.submit(
            {"context": str(context_dir), "tags": [f"reg/cap{i}:1"], "build_args": {"STANDIN_SCENARIO": slow}}
        )
        for i in range(6)
    ]
    records = [h.wait(timeout=120) for h in handles]
    assert all(r["state"] == "succeeded" for r in records)
    runs = [(a["daemon"], ts(a["started_at"]), ts(a["finished_at"])) for r in records for a in r["attempts"]]
    assert {d for d, _, _ in runs} == {"tcp://daemon-a:1234", "tcp://daemon-b:1234"}
    for daemon in ("tcp://daemon-a:1234", "tcp://daemon-b:1234"):
        mine = sorted((s, e) for d, s, e in runs if d == daemon)
        for (_, end), (start, _) in zip(mine, mine[1:], strict=False):
            assert start >= end - 0.01, f"two builds at once on {daemon}"
    # 4 worker processes, 2 slots: some builds waited for a slot, and that wait is queue time
    assert max(r["phases"]["queued"] for r in records) > 0.5
    assert len(standin_log.starts()) == 6


def test_health_command_reports_broker_and_daemons(buildq_env, start_worker):
    import os

    start_worker(buildq_env)  # the "workers" check wants one live worker

    full = {k: v for k, v in os.environ.items() if not k.startswith("BUILDQ_")}
    full.update(buildq_env)
    out = subprocess.run(
        [sys.executable, "-m", "buildq", "health", "--json"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    names = [c["name"] for c in report["checks"]]
    assert any("broker" in n for n in names)
    assert any("tcp://127.0.0.1:1234" in n for n in names)

    refused = {**full, "STANDIN_SCENARIO": scenario(kind="refused")}
    out = subprocess.run(
        [sys.executable, "-m", "buildq", "health"],
        env=refused,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert "connection refused" in out.stdout
