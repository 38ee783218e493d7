"""Transient failures retry themselves; no build is lost, doubled or orphaned (real Redis, real workers)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from buildq.celeryapp.app import create_app
from tests.conftest import scenario
from tests.harness import client_for, free_port, settings_from, start_redis_server, wait_until

GOAWAY = (
    "failed to receive status: rpc error: code = Unavailable desc = closing transport due to: "
    'connection error: desc = "error reading from server: EOF", received prior goaway: '
    'code: NO_ERROR, debug data: "graceful_stop"'
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_storm_every_job_succeeds_exactly_once(buildq_env, start_worker, context_dir, standin_log, tmp_path):
    """200 jobs, ~30 % of attempts fail with varied transient texts: all succeed, one success each."""
    jobs = 200
    env = {
        **buildq_env,
        "BUILDQ_RETRY_MAX_ATTEMPTS": "10",
        "STANDIN_SCENARIO": scenario(kind="flaky", state_dir=str(tmp_path / "flaky"), p=0.3, seed=7),
    }
    start_worker(env, concurrency=2)
    start_worker(env, concurrency=2)
    client = client_for(env)
    handles = [
        client.submit(
            {"context": str(context_dir), "tags": [f"reg:5000/storm/app{i}:1"], "job_id": f"storm-{i}"}
        )
        for i in range(jobs)
    ]
    records = [h.wait(timeout=300) for h in handles]

    assert [r["state"] for r in records] == ["succeeded"] * jobs
    ends = standin_log.ends()
    by_key: dict[str, list[dict]] = collections.defaultdict(list)
    for end in ends:
        by_key[end["key"]].append(end)
    failures = sum(1 for e in ends if e["outcome"] == "failed")
    assert len(by_key) == jobs
    for record in records:
        key = record["image"]["names"][0]
        runs = by_key[key]
        assert [e["outcome"] for e in runs].count("succeeded") == 1, key
        # every invocation is one recorded attempt, in order, only the last one succeeded
        assert len(record["attempts"]) == len(runs)
        assert [a["outcome"] for a in record["attempts"]] == ["failed"] * (len(runs) - 1) + ["succeeded"]
        assert all(a["reason"] for a in record["attempts"][:-1])
    assert 0.2 < failures / len(ends) < 0.4  # the injected rate really was about 30 %
    assert len(standin_log.starts()) == len(ends)  # nothing started and left running
    reasons = collections.Counter(a["reason"] for r in records for a in r["attempts"][:-1])
    print(
        f"\nstorm: jobs={jobs} attempts={len(ends)} injected_failures={failures} retries={failures} "
        f"losses=0 duplicates=0 reasons={dict(reasons)}"
    )


def test_permanent_error_is_not_retried(buildq_env, start_worker, context_dir, standin_log):
    start_worker(buildq_env)
    text = 'failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 2'
    handle = client_for(buildq_env).submit(
        {
            "context": str(context_dir),
            "tags": ["reg/perm:1"],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="fail", error=text)},
        }
    )
    record = handle.wait(timeout=60)
    assert record["state"] == "failed"
    assert record["error"]["kind"] == "permanent"
    assert record["error"]["reason"] == "step_failed"
    assert len(record["attempts"]) == 1
    assert len(standin_log.starts()) == 1


def test_transient_errors_exhaust_attempts(buildq_env, start_worker, context_dir, standin_log):
    env = {**buildq_env, "BUILDQ_RETRY_MAX_ATTEMPTS": "3"}
    start_worker(env)
    handle = client_for(env).submit(
        {
            "context": str(context_dir),
            "tags": ["reg/goaway:1"],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="fail", error=GOAWAY)},
        }
    )
    record = handle.wait(timeout=60)
    assert record["state"] == "failed"
    assert record["error"]["kind"] == "transient_exhausted"
    assert record["error"]["message"] == GOAWAY
    assert [a["number"] for a in record["attempts"]] == [1, 2, 3]
    assert all(a["outcome"] == "failed" and a["error"] == GOAWAY for a in record["attempts"])
    assert len(standin_log.starts()) == 3


def test_sigkill_of_worker_process_redelivers_once_without_orphan(
    buildq_env, start_worker, context_dir, standin_log
):
    worker = start_worker(buildq_env, concurrency=1)
    handle = client_for(buildq_env).submit(
        {
            "context": str(context_dir),
            "tags": ["reg/killed:1"],
            "job_id": "killed-1",
            # long enough to outlive the dead process's lease (3 s) even on a loaded machine
            "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=8)},
        }
    )
    first = wait_until(lambda: standin_log.starts(), timeout=30)[0]
    standin_pid = first["pid"]
    ppid = int(
        subprocess.run(
            ["ps", "-o", "ppid=", "-p", str(standin_pid)], capture_output=True, text=True
        ).stdout.strip()
    )
    assert ppid in worker.children()
    os.kill(ppid, signal.SIGKILL)  # the pool process running the build dies mid-build

    record = handle.wait(timeout=60)
    assert record["state"] == "succeeded"
    # the redelivery waited out the dead process's lease, took the job over and recorded the run
    # the dead process lost
    assert [(a["outcome"], a["reason"]) for a in record["attempts"]] == [
        ("lost", "worker_lost"),
        ("succeeded", None),
    ]
    ends = standin_log.ends()
    assert [e["outcome"] for e in ends] == ["succeeded"]  # finished once
    assert len(standin_log.starts()) == 2  # the killed run and the redelivered one
    assert not pid_alive(standin_pid)  # the orphaned buildctl of the dead process was killed
    assert ends[0]["pid"] != standin_pid


def test_cancel_running_build_kills_it_within_two_seconds(buildq_env, start_worker, context_dir, standin_log):
    start_worker(buildq_env)
    client = client_for(buildq_env)
    handle = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/cancel:1"],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")},
        }
    )
    started = wait_until(lambda: standin_log.starts(), timeout=30)[0]
    t0 = time.monotonic()
    handle.cancel()
    record = handle.wait(timeout=10)
    assert record["state"] == "cancelled"
    assert record["error"]["kind"] == "cancelled"
    wait_until(lambda: not pid_alive(started["pid"]), timeout=2.5)
    assert time.monotonic() - t0 < 2.5
    assert len(record["attempts"]) == 1  # no retry
    time.sleep(0.5)
    assert len(standin_log.starts()) == 1


def test_cancel_queued_build_never_starts(buildq_env, start_worker, context_dir, standin_log):
    start_worker(buildq_env, concurrency=1)
    client = client_for(buildq_env)
    blocker = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/block:1"],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")},
        }
    )
    wait_until(lambda: standin_log.starts(), timeout=30)
    queued = client.submit({"context": str(context_dir), "tags": ["reg/queued:1"]})
    assert client.status(queued.job_id)["state"] == "queued"
    queued.cancel()
    blocker.cancel()
    assert queued.wait(timeout=30)["state"] == "cancelled"
    assert blocker.wait(timeout=30)["state"] == "cancelled"
    assert [s["key"] for s in standin_log.starts()] == ["reg/block:1"]


def test_duplicate_delivery_of_a_finished_job_returns_the_result(
    buildq_env, start_worker, context_dir, standin_log
):
    start_worker(buildq_env)
    client = client_for(buildq_env)
    job = {"context": str(context_dir), "tags": ["reg/dup:1"], "job_id": "dup-1"}
    first = client.submit(job).wait(timeout=60)
    client.submit(job)  # the same job id again, as a redelivery would
    app = create_app(settings_from(buildq_env))  # and a raw Celery message of it
    app.send_task("buildq.build", kwargs={"job": job}, task_id="dup-1", queue=buildq_env["BUILDQ_QUEUE"])
    app.close()
    time.sleep(1.0)
    assert client.wait("dup-1", timeout=10) == first
    assert len(standin_log.starts()) == 1


def test_concurrent_duplicates_run_one_buildctl(buildq_env, start_worker, context_dir, standin_log):
    start_worker(buildq_env, concurrency=2)
    client = client_for(buildq_env)
    job = {
        "context": str(context_dir),
        "tags": ["reg/twin:1"],
        "job_id": "twin-1",
        "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=1.5)},
    }
    client.submit(job)
    client.submit(job)
    record = client.wait("twin-1", timeout=60)
    assert record["state"] == "succeeded"
    time.sleep(1.0)
    assert len(standin_log.starts()) == 1
    assert len(standin_log.ends()) == 1


def _start_private_redis(port: int, data_dir: Path) -> None:
    """A Redis that keeps its data across a restart (AOF, fsync always)."""
    data_dir.mkdir(exist_ok=True)
    start_redis_server(
        port,
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--pidfile",
        str(data_dir / "redis.pid"),
    )


@pytest.fixture
def private_redis(tmp_path):
    port = free_port()
    data = tmp_path / "redis"
    _start_private_redis(port, data)
    yield port, data
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)


def test_redis_restart_loses_no_queued_job(buildq_env, start_worker, context_dir, standin_log, private_redis):
    """Jobs queued across a Redis restart all run once; a worker that lived through the restart
    reconnects and takes new jobs. (Builds cut off mid-flight are covered by test_janitor.py.)"""
    port, data = private_redis
    env = {
        **buildq_env,
        "BUILDQ_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "BUILDQ_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1",
        "BUILDQ_REQUEUE_LOST_AFTER_S": "2",
    }
    client = client_for(env)
    queued = [
        client.submit({"context": str(context_dir), "tags": [f"reg/restart{i}:1"], "job_id": f"rs-{i}"})
        for i in range(12)
    ]
    _restart_private_redis(port, data)  # everything is still in the queue
    start_worker(env, concurrency=2)
    assert [client_for(env).wait(h.job_id, timeout=60)["state"] for h in queued] == ["succeeded"] * 12

    # the worker is connected and idle: every delivery acknowledged (a restart in the middle of an
    # ack is another story: Celery 5.x may exit with "Unrecoverable error", see docs/reliability.md)
    broker = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    wait_until(lambda: broker.hlen("unacked") == 0, timeout=30)
    time.sleep(0.5)
    _restart_private_redis(port, data)
    later = [
        client_for(env).submit(
            {"context": str(context_dir), "tags": [f"reg/after{i}:1"], "job_id": f"ra-{i}"}
        )
        for i in range(4)
    ]
    assert [client_for(env).wait(h.job_id, timeout=60)["state"] for h in later] == ["succeeded"] * 4
    succeeded = collections.Counter(e["key"] for e in standin_log.ends() if e["outcome"] == "succeeded")
    expected = [f"reg/restart{i}:1" for i in range(12)] + [f"reg/after{i}:1" for i in range(4)]
    assert sorted(succeeded) == sorted(expected) and set(succeeded.values()) == {1}


def _restart_private_redis(port: int, data: Path) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "shutdown"], check=False, capture_output=True)
    wait_until(
        lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0,
        timeout=10,
    )
    time.sleep(1.0)
    _start_private_redis(port, data)


def test_warm_shutdown_lets_a_running_build_finish(buildq_env, start_worker, context_dir, standin_log):
    worker = start_worker({**buildq_env, "BUILDQ_SHUTDOWN_GRACE_S": "60"}, concurrency=1)
    handle = client_for(buildq_env).submit(
        {
            "context": str(context_dir),
            "tags": ["reg/warm:1"],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=1.5)},
        }
    )
    wait_until(lambda: standin_log.starts(), timeout=30)
    assert worker.stop(timeout=30) == 0  # SIGTERM: warm shutdown waits for the build
    assert handle.wait(timeout=5)["state"] == "succeeded"
    assert [e["outcome"] for e in standin_log.ends()] == ["succeeded"]


def test_warm_shutdown_grace_is_bounded_and_the_build_is_not_lost(
    buildq_env, start_worker, context_dir, standin_log
):
    env = {**buildq_env, "BUILDQ_SHUTDOWN_GRACE_S": "1"}
    worker = start_worker(env, concurrency=1)
    handle = client_for(env).submit(
        {
            "context": str(context_dir),
            "tags": ["reg/grace:1"],
            "job_id": "grace-1",
            "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=6)},
        }
    )
    first = wait_until(lambda: standin_log.starts(), timeout=30)[0]
    t0 = time.monotonic()
    worker.stop(timeout=30)
    assert time.monotonic() - t0 < 5.5  # the 6 s build did not hold the shutdown
    # the grace ended the build: it did not run to success under the stopping worker
    assert [e for e in standin_log.ends() if e["outcome"] == "succeeded"] == []
    assert handle.status()["state"] != "succeeded"
    start_worker(env, concurrency=1)  # the message went back to the queue: a new worker finishes it
    assert handle.wait(timeout=60)["state"] == "succeeded"
    assert not pid_alive(first["pid"])
    assert [e["outcome"] for e in standin_log.ends()].count("succeeded") == 1
