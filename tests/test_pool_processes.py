"""The production configuration while pool processes come and go (what the compose stack runs).

A real ``buildq worker`` with the metrics port on, two pool processes, the janitor and the daemon
watch running, and producers that do not retry by themselves. While builds run, a pool process is
SIGKILLed between builds (what an OOM kill does), the pool is grown and shrunk (``celery control``), and
``--max-tasks-per-child 2`` recycles processes: every build must succeed on its first delivery,
``/metrics`` must count every one of them, and the worker log must show no task that "raised
unexpected". The docker-marked variant does the same with the docker launcher's warm containers
(a replaced child's container is reaped, its successor gets its own).
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from buildq.celeryapp.app import create_app
from tests.conftest import scenario
from tests.conftest_docker import STANDIN_IMAGE
from tests.harness import WorkerProcess, base_env, client_for, flush_dbs, free_port, settings_from, wait_until


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def counter(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return 0.0


def job(context: Path, **scen: Any) -> dict[str, Any]:
    return {
        "context": str(context),
        "tags": [f"127.0.0.1:5000/pool/app:{uuid.uuid4().hex[:6]}"],
        "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", **scen)},
    }


def kill_one(pids: list[int]) -> int:
    """SIGKILL the first of ``pids`` still alive; its pid (0: none was). With --max-tasks-per-child
    a listed pool process may be ending by itself meanwhile."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        return pid
    return 0


def run_the_production_configuration(
    env: dict[str, str], context: Path, log_dir: Path, after_kill: Any = None
) -> dict[str, Any]:
    port = free_port()
    env = {**env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(log_dir / "metrics")}
    worker = WorkerProcess(env, concurrency=2, log_dir=log_dir, extra_args=("--max-tasks-per-child", "2"))
    worker.wait_ready()
    client = client_for(env)
    app = create_app(settings_from(env))
    node = f"{worker.name}@{os.uname().nodename}"
    submitted: list[str] = []
    started_children: set[int] = set()
    try:
        wait_until(lambda: len(worker.children()) == 2, timeout=30)
        started_children.update(worker.children())

        def submit(n: int, **scen: Any) -> None:
            for _ in range(n):
                submitted.append(client.submit(job(context, **scen)).job_id)

        submit(4, sleep_s=0.3)
        for job_id in submitted:
            client.wait(job_id, timeout=60)
        # an idle pool process killed as an OOM kill would: Celery starts another in its place
        victim = wait_until(lambda: kill_one(worker.children()), timeout=30)
        wait_until(lambda: victim not in worker.children() and len(worker.children()) >= 2, timeout=30)
        started_children.update(worker.children())
        if after_kill is not None:
            after_kill(victim)
        submit(4, sleep_s=0.2)
        app.control.pool_grow(1, destination=[node])
        wait_until(lambda: len(worker.children()) >= 3, timeout=30)
        started_children.update(worker.children())
        submit(4, sleep_s=0.2)
        app.control.pool_shrink(1, destination=[node])
        submit(4)
        records = [client.wait(job_id, timeout=120) for job_id in submitted]
        started_children.update(worker.children())

        def counted() -> str | None:
            text = metrics(port)
            return (
                text if counter(text, "buildq_builds_total", outcome="succeeded") >= len(submitted) else None
            )

        text = wait_until(counted, timeout=15)
        return {"records": records, "metrics": text, "log": worker.log(), "children": started_children,
                "worker": worker}  # fmt: skip
    finally:
        worker.stop()
        app.close()


def check(result: dict[str, Any]) -> None:
    records = result["records"]
    text = result["metrics"]
    print(f"\npool processes: builds={len(records)} first_delivery="
          f"{sum(len(r['attempts']) == 1 for r in records)} pool_processes_started={len(result['children'])} "
          f"metrics_succeeded={counter(text, 'buildq_builds_total', outcome='succeeded'):.0f} "
          f"metrics_failed={counter(text, 'buildq_builds_total', outcome='failed'):.0f}")  # fmt: skip
    assert [r["state"] for r in records] == ["succeeded"] * len(records)
    assert all(len(r["attempts"]) == 1 for r in records), [
        r["attempts"] for r in records if len(r["attempts"]) > 1
    ]
    text = result["metrics"]
    assert counter(text, "buildq_builds_total", outcome="succeeded") == len(records)
    assert counter(text, "buildq_builds_total", outcome="failed") == 0
    assert "raised unexpected" not in result["log"] and "DuplicateTimeseries" not in result["log"]
    # the pool was replaced, grown and recycled: more processes than the two it started with
    assert len(result["children"]) >= 4


def test_every_pool_process_builds_like_the_first(tmp_path: Path, standin: Path, context_dir: Path) -> None:
    env = base_env(20, f"pp{uuid.uuid4().hex[:6]}", BUILDQ_BUILDCTL_PATH=str(standin),
                   BUILDQ_LOCAL_STATE_DIR=str(tmp_path / "state"))  # fmt: skip
    flush_dbs(env)
    check(run_the_production_configuration(env, context_dir, tmp_path))


@pytest.mark.docker
def test_every_pool_process_builds_like_the_first_with_warm_containers(
    tmp_path: Path, docker_url: str, docker_api: Any, context_dir: Path
) -> None:
    env = base_env(
        22, f"pd{uuid.uuid4().hex[:6]}", BUILDQ_LAUNCHER="docker", BUILDQ_BUILDCTL_IMAGE=STANDIN_IMAGE,
        BUILDQ_DOCKER_URL=docker_url, BUILDQ_DOCKER_NETWORK="none", BUILDQ_CONTEXT_ROOTS=str(tmp_path),
        BUILDQ_DEPLOYMENT=f"pp-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    flush_dbs(env)
    deployment = env["BUILDQ_DEPLOYMENT"]

    def warm(*labels: str) -> list[dict[str, Any]]:
        wanted = [f"buildq.deployment={deployment}", "buildq.warm=true", *labels]
        return list(docker_api.containers(all=True, filters={"label": wanted}))

    def victims_container_goes(pid: int) -> None:
        # the killed child's warm container goes with it (stdin attached, AutoRemove; else reaped)
        def gone() -> bool:
            return not [c for c in warm() if c["Labels"].get("buildq.worker", "").endswith(f":{pid}")]

        wait_until(gone, timeout=40)

    result = run_the_production_configuration(env, context_dir, tmp_path, after_kill=victims_container_goes)
    check(result)
    wait_until(lambda: warm() == [], timeout=60)  # none is left once the worker stopped
