"""A stalled worker, a second host, a dead retry holder: nothing lost, overwritten or run twice at once.

Two workers with separate state folders stand in for two hosts (each has its own run files and
reaper); a pool process is stopped with SIGSTOP past its lease and continued with SIGCONT, a whole
worker is SIGKILLed while it holds a retry's message. The store-level cases of the janitor are tested
directly against Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.contract.wire import build_message
from buildq.store.janitor import requeue_stalled
from buildq.store.jobs import JobStore
from buildq.store.keys import UNACKED_INDEX_KEY, UNACKED_KEY, WORKERS, job_keys
from tests.conftest import scenario
from tests.harness import REDIS_URL, StandinLog, base_env, client_for, flush_dbs, wait_until


def host_env(queue: str, standin: Path, state: Path, log: StandinLog, **extra: str) -> dict[str, str]:
    env = base_env(
        16, queue, BUILDQ_BUILDCTL_PATH=str(standin), BUILDQ_LOCAL_STATE_DIR=str(state),
        BUILDQ_LEASE_TTL_S="1.5", BUILDQ_REQUEUE_LOST_AFTER_S="2", **extra,
    )  # fmt: skip
    env["STANDIN_LOG"] = str(log.path)
    return env


def parent_of(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True).stdout
    return int(out.strip())


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its stopped parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class OverlapWatch(threading.Thread):
    """Samples every 20 ms how many build runs of the stand-in are alive at once."""

    def __init__(self, log: StandinLog) -> None:
        super().__init__(daemon=True)
        self.log, self.most, self.stop = log, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            alive = [s["pid"] for s in self.log.starts() if running(s["pid"])]
            self.most = max(self.most, len(alive))


def test_a_stalled_worker_is_fenced_out_and_the_other_host_never_overlaps_it(
    tmp_path: Path, standin: Path, context_dir: Path, start_worker: Any
) -> None:
    log = StandinLog(tmp_path / "standin.jsonl")
    queue = f"st{uuid.uuid4().hex[:6]}"
    a = host_env(queue, standin, tmp_path / "host-a", log)
    flush_dbs(a)
    b = host_env(queue, standin, tmp_path / "host-b", log)
    worker_a = start_worker(a, concurrency=1, name="hosta")
    client = client_for(a)
    job = {"context": str(context_dir), "tags": ["reg/stall:1"], "job_id": f"stall-{uuid.uuid4().hex[:6]}",
           "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=4)}}  # fmt: skip
    client.submit(job)
    first = wait_until(lambda: log.starts(), timeout=30)[0]
    stalled = parent_of(first["pid"])
    assert stalled in worker_a.children()
    watch = OverlapWatch(log)
    watch.start()
    os.kill(stalled, signal.SIGSTOP)  # the pool process stalls; its buildctl runs on
    try:
        start_worker(b, concurrency=1, name="hostb")  # the other host: its janitor takes the job over
        record = client.wait(job["job_id"], timeout=90)
    finally:
        os.kill(stalled, signal.SIGCONT)
        watch.stop.set()
    assert record["state"] == "succeeded" and record["worker"].split(":")[1] != str(stalled)
    assert [a["outcome"] for a in record["attempts"]] == ["lost", "succeeded"]
    # the stalled run was killed by its own host's reaper before the other host launched
    assert len(log.starts()) == 2 and watch.most == 1
    # woken up, the stalled holder finds it was fenced out and stores nothing over the good record
    wait_until(lambda: "another delivery claimed" in worker_a.log(), timeout=30)
    time.sleep(0.5)  # nothing arrives late: the record is still the other host's
    assert client.wait(job["job_id"], timeout=5) == record


def test_a_retry_held_by_a_worker_that_died_is_put_back(
    tmp_path: Path, standin: Path, context_dir: Path, start_worker: Any
) -> None:
    log = StandinLog(tmp_path / "standin.jsonl")
    queue = f"rh{uuid.uuid4().hex[:6]}"
    flaky_state = tmp_path / "flaky"
    a = host_env(queue, standin, tmp_path / "host-a", log, BUILDQ_RETRY_BACKOFF_BASE_S="8",
                 BUILDQ_RETRY_BACKOFF_CAP_S="8")  # fmt: skip
    flush_dbs(a)
    worker_a = start_worker(a, concurrency=1, name="holder")
    client = client_for(a)
    jobs = []
    for i in range(3):
        scen = scenario(kind="flaky", state_dir=str(flaky_state), key=f"k{i}", fail_first=1)
        jobs.append(client.submit({"context": str(context_dir), "tags": [f"reg/held:{i}"],
                                   "build_args": {"STANDIN_SCENARIO": scen}}).job_id)  # fmt: skip

    # every job fails once and waits out its backoff (a jittered 0-8 s) as a message held by worker
    # A; kill A while at least one retry is held (the others may be running or done by then)
    def holding() -> list[str] | None:
        infos = {j: client.store.info(j) for j in jobs}
        held = [j for j, i in infos.items() if i.get("phase") == "retry_wait" and i.get("held_by")]
        return held or None

    held = wait_until(holding, timeout=60)
    worker_a.kill()  # the whole worker, with the retries it held
    start_worker(a, concurrency=2, name="survivor")
    records = {j: client.wait(j, timeout=90) for j in jobs}
    assert [r["state"] for r in records.values()] == ["succeeded"] * 3
    # a held retry is put back and runs once more: it failed once, then succeeded (no lost attempt)
    assert all([x["outcome"] for x in records[j]["attempts"]] == ["failed", "succeeded"] for j in held)


# -- the janitor's rule for held retries, against Redis ----------------------------------------


@pytest.fixture
def store() -> Any:
    s = JobStore(redis.Redis.from_url(f"{REDIS_URL}/17"), result_ttl_s=60)
    s.redis.flushdb()
    yield s
    s.redis.flushdb()


def held_retry(store: JobStore, job_id: str, *, eta: float, holder: str | None) -> str:
    """A retry's ETA message delivered to a worker (kombu's unacked records) and its job hash."""
    tag = uuid.uuid4().hex
    message = build_message(job_id, "q", {"job_id": job_id}, delivery="d2", delivery_tag=tag, eta=eta)
    now = store.redis.time()[0]
    store.redis.hset(UNACKED_KEY, tag, json.dumps([json.loads(message), "", "q"]))
    store.redis.zadd(UNACKED_INDEX_KEY, {tag: now - 100})
    store.redis.hset(job_keys(job_id).hash, mapping={"state": "queued", "phase": "retry_wait"})
    if holder is not None:
        store.held_by(job_id, holder)
    return tag


def test_a_held_retry_stays_while_its_holder_lives_and_is_put_back_when_it_is_gone(store: JobStore) -> None:
    now = store.redis.time()[0]
    held_retry(store, "alive-1", eta=now + 300, holder="w-alive@h")
    held_retry(store, "dead-1", eta=now + 300, holder="w-dead@h")
    store.heartbeat(worker="w-alive@h", domain="d", ttl_s=30)
    assert requeue_stalled(store, after_s=10) == ["dead-1"]
    assert store.redis.llen("q") == 1
    assert store.redis.zscore(WORKERS, "w-alive@h") is not None


def test_a_retry_nobody_said_it_holds_is_put_back_only_well_after_its_eta(store: JobStore) -> None:
    now = store.redis.time()[0]
    held_retry(store, "young", eta=now - 5, holder=None)
    held_retry(store, "old", eta=now - 60, holder=None)
    assert requeue_stalled(store, after_s=10) == ["old"]


# -- a Redis without persistence, and what status says of a job it lost ------------------------


def test_a_worker_refuses_to_start_on_a_redis_without_an_append_only_file_when_asked(standin: Path) -> None:
    from tests.harness import run_cli

    env = base_env(18, "np", BUILDQ_BUILDCTL_PATH=str(standin), BUILDQ_REDIS_PERSISTENCE="require")
    done = run_cli(env, "worker", timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "appendonly no" in lines[0] and "BUILDQ_REDIS_PERSISTENCE" in lines[0], lines


def test_status_tells_a_job_lost_with_redis_data_from_one_never_seen() -> None:
    from buildq.contract.job import new_job_id
    from tests.harness import run_cli

    env = base_env(19, "lost")
    flush_dbs(env)
    client = client_for(env)
    client.store.heartbeat(worker="w", domain="d", ttl_s=5)  # this Redis's data begins now
    old = new_job_id(time.time() - 3600)  # submitted an hour ago, to a Redis that since lost it
    assert client.status(old)["state"] == "lost"
    assert client.status(new_job_id())["state"] == "unknown"
    assert client.status("my-own-id")["state"] == "unknown"  # a producer's own id: cannot tell
    out = run_cli(env, "status", old)
    assert out.returncode == 1 and "is lost" in out.stderr and "Traceback" not in out.stderr


def test_celery_control_shutdown_keeps_the_shutdown_grace(
    tmp_path: Path, standin: Path, context_dir: Path, start_worker: Any
) -> None:
    from buildq.celeryapp.app import create_app
    from tests.harness import settings_from

    log = StandinLog(tmp_path / "standin.jsonl")
    env = host_env(f"sd{uuid.uuid4().hex[:6]}", standin, tmp_path / "s", log, BUILDQ_SHUTDOWN_GRACE_S="2")
    flush_dbs(env)
    worker = start_worker(env, concurrency=1, name="remote")
    client_for(env).submit({"context": str(context_dir), "tags": ["reg/sd:1"],
                            "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")}})  # fmt: skip
    wait_until(lambda: log.starts(), timeout=30)
    app = create_app(settings_from(env))
    try:
        app.control.shutdown(destination=[f"remote@{os.uname().nodename}"])
    finally:
        app.close()
    asked = time.monotonic()
    worker.proc.wait(timeout=40)  # Celery's own command would wait for the build without a limit
    assert time.monotonic() - asked < 30
    assert "warm shutdown, for at most 2s" in worker.log()
