"""Builds through the queue against genuine buildctl/buildkitd v0.21.0 (opt-in: ``buildkit`` marker).

Run on a development machine with ``BUILDQ_TEST_BUILDKIT_BIN=/path/to/bin`` (docs/development.md);
skipped otherwise. A cold and a warm build with a real registry, and a daemon restart in the
middle of a RUN step (SIGTERM, SIGKILL after 2 s, back after 20 s and after 60 s) that the build
survives, two daemons of which one is killed: new builds go to the live one, and a context uploaded
as a registry blob that buildkitd fetches by URL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.genuine import Daemon, Registry, bin_dir, busybox_base
from tests.harness import base_env, client_for, flush_dbs, wait_until

pytestmark = [
    pytest.mark.buildkit,
    pytest.mark.skipif(bin_dir() is None, reason="BUILDQ_TEST_BUILDKIT_BIN is not set (genuine BuildKit)"),
]


@pytest.fixture
def genuine(tmp_path: Path) -> Iterator[dict[str, Any]]:
    bins = bin_dir()
    assert bins is not None
    registry = Registry(tmp_path / "registry")
    daemon = Daemon(bins, tmp_path / "buildkitd", registry)
    try:
        base = busybox_base(bins, daemon, registry, tmp_path)
        yield {"bins": bins, "registry": registry, "daemon": daemon, "base": base}
    finally:
        daemon.stop()
        registry.stop()


def deployment(genuine: dict[str, Any], tmp_path: Path, db: int) -> dict[str, str]:
    env = base_env(
        db,
        f"g{uuid.uuid4().hex[:8]}",
        BUILDQ_BUILDCTL_PATH=str(genuine["bins"] / "buildctl"),
        BUILDQ_BUILDKIT_HOST=genuine["daemon"].addr,
        BUILDQ_INSECURE_REGISTRIES=genuine["registry"].host,
        BUILDQ_LOCAL_STATE_DIR=str(tmp_path / "state"),
        BUILDQ_RETRY_BACKOFF_BASE_S="1",
        BUILDQ_RETRY_BACKOFF_CAP_S="4",
    )
    flush_dbs(env)
    return env


def project(tmp_path: Path, base: str, sleep_s: int) -> Path:
    ctx = tmp_path / "project"
    ctx.mkdir()
    (ctx / "app.txt").write_text("hello from buildq\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {base} AS build\nRUN echo built > /built && sleep {sleep_s}\n"
        f"FROM {base}\nCOPY --from=build /built /built\nCOPY app.txt /app.txt\n"
    )
    return ctx


def test_cold_then_warm_build_through_the_queue(genuine, tmp_path, start_worker) -> None:
    env = deployment(genuine, tmp_path, 2)
    start_worker(env, concurrency=1)
    client = client_for(env)
    ctx = project(tmp_path, genuine["base"], 1)
    tag = f"{genuine['registry'].host}/demo/app:1"
    cold = client.submit({"context": str(ctx), "tags": [tag]}).wait(timeout=180)
    warm = client.submit({"context": str(ctx), "tags": [tag]}).wait(timeout=180)
    for record in (cold, warm):
        assert record["state"] == "succeeded", record.get("error")
        assert record["image"]["digest"].startswith("sha256:")
    assert cold["steps"]["executed"] >= 2
    # warm: every RUN and COPY comes from the daemon's cache (a FROM is resolved, never "cached")
    assert warm["steps"]["cached"] == cold["steps"]["total"] - 1
    assert all(s["cached"] for s in warm["slowest_steps"] if " FROM " not in s["name"])
    assert cold["image"]["digest"] == warm["image"]["digest"]
    for name, record in (("cold", cold), ("warm", warm)):
        phases = " ".join(f"{k}={v:.3f}" for k, v in record["phases"].items())
        print(f"\ngenuine {name} build: {record['duration_s']:.3f}s; {phases}")


@pytest.mark.parametrize("down_s", [20.0, 60.0])
def test_a_daemon_restart_mid_run_is_retried_to_success(genuine, tmp_path, start_worker, down_s) -> None:
    env = deployment(genuine, tmp_path, 4)
    start_worker(env, concurrency=1)
    client = client_for(env)
    ctx = project(tmp_path, genuine["base"], 8)
    handle = client.submit({"context": str(ctx), "tags": [f"{genuine['registry'].host}/demo/restart:1"]})
    wait_until(lambda: client.status(handle.job_id).get("phase") == "build", timeout=60)
    time.sleep(1.0)  # inside the RUN step
    daemon: Daemon = genuine["daemon"]
    stopped = time.monotonic()
    daemon.stop(kill_after_s=2.0)
    time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
    daemon.start()
    record = handle.wait(timeout=240)
    assert record["state"] == "succeeded", record.get("error")
    first = record["attempts"][0]
    assert first["outcome"] == "failed" and first["reason"] in ("goaway", "daemon_unavailable")
    refused = [a for a in record["attempts"] if a["reason"] == "daemon_unreachable"]
    assert len(refused) <= 3
    outcomes = ", ".join(f"{a['number']}:{a['outcome']}/{a['reason']}" for a in record["attempts"])
    print(f"\ngenuine restart, {down_s:g}s down: {record['duration_s']:.1f}s, attempts {outcomes}")
    print(f"first error: {first['error']}")


def test_with_one_of_two_daemons_killed_builds_go_to_the_live_one(genuine, tmp_path, start_worker) -> None:
    second = Daemon(genuine["bins"], tmp_path / "buildkitd-2", genuine["registry"])
    try:
        env = deployment(genuine, tmp_path, 6)
        env["BUILDQ_BUILDKIT_HOSTS"] = f"{genuine['daemon'].addr},{second.addr}"
        start_worker(env, concurrency=2)
        client = client_for(env)
        ctx = project(tmp_path, genuine["base"], 0)
        genuine["daemon"].stop(kill_after_s=0.0)  # SIGKILL at once
        killed = time.time()
        handles = [
            client.submit({"context": str(ctx), "tags": [f"{genuine['registry'].host}/demo/two{i}:1"]})
            for i in range(4)
        ]
        records = [h.wait(timeout=180) for h in handles]
        assert all(r["state"] == "succeeded" for r in records), [r.get("error") for r in records]
        assert all(r["attempts"][-1]["daemon"] == second.addr for r in records)
        refused = [a for r in records for a in r["attempts"] if a["reason"] == "daemon_unreachable"]
        assert len(refused) <= 2  # the breaker opened at the first refusal
        on_live = min(datetime_ts(r["attempts"][-1]["started_at"]) for r in records) - killed
        print(f"\ngenuine, one of two daemons killed: first build on the live one {on_live:.2f}s after"
              f" the kill; {len(refused)} build(s) launched against the dead one")  # fmt: skip
        assert on_live < 5
    finally:
        second.stop()


def datetime_ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_an_uploaded_context_builds_from_its_blob_url(genuine, tmp_path, start_worker) -> None:
    """A producer with no shared path: the context goes to the registry as a blob, buildkitd fetches it."""
    env = deployment(genuine, tmp_path, 8)
    env["BUILDQ_CONTEXT_REPOSITORY"] = f"{genuine['registry'].host}/buildq/contexts"
    start_worker(env, concurrency=1)
    client = client_for(env)
    ctx = project(tmp_path, genuine["base"], 0)
    (ctx / ".dockerignore").write_text("secret.txt\n")
    (ctx / "secret.txt").write_text("not for the image\n")
    handle = client.submit(
        {"context": str(ctx), "tags": [f"{genuine['registry'].host}/demo/up:1"]}, upload=True
    )
    record = handle.wait(timeout=180)
    assert record["state"] == "succeeded", record.get("error")
    lines = [e.line for e in client.logs(handle.job_id)]
    assert any("load remote build context" in line for line in lines)
    print(f"\ngenuine uploaded context: {record['duration_s']:.3f}s")
