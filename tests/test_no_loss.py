"""No build is killed, lost or written twice: not by another delivery, not by another deployment.

Each test below failed before its fix (the issue's list, in order); the chaos test restarts a
Redis with AOF under 50 builds.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.contract.wire import build_message
from buildq.launchers.base import LaunchSpec
from buildq.launchers.local import LocalLauncher
from buildq.store.janitor import Janitor, requeue_lost
from buildq.store.jobs import Claimed, Fence, JobStore, LogEnd
from buildq.store.keys import JOBS_INDEX, QUEUES, UNACKED_KEY, job_key
from tests.conftest import scenario
from tests.harness import (
    REDIS_URL,
    StandinLog,
    base_env,
    client_for,
    flush_dbs,
    free_port,
    start_redis_server,
    submit_retrying,
    wait_retrying,
    wait_until,
)
from tests.inprocess import deliver, pool_env, pool_runtime
from tests.test_producers import raw_celery_message

DB_URL = f"{REDIS_URL}/13"


@pytest.fixture
def r() -> Any:
    client = redis.Redis.from_url(DB_URL)
    client.flushdb()
    yield client
    client.flushdb()


# -- 1. another deployment on the same host ---------------------------------------------------


def sleeper(tmp_path: Path) -> str:
    exe = tmp_path / "bin" / "buildctl"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nsleep 30\ntrue\n")  # sh stays: its cmdline names the script
    exe.chmod(0o755)
    return str(exe)


def test_a_launcher_reaps_only_its_own_deployments_orphans(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    ours = LocalLauncher(sleeper(tmp_path), state_dir=state, deployment="deploy-a")
    theirs = LocalLauncher(sleeper(tmp_path), state_dir=state, deployment="deploy-b")
    builds = []
    for launcher in (ours, theirs):  # the same job id in two deployments
        spec = LaunchSpec(job_id="same-job", argv=["build"], env={})
        builds.append(launcher.start(spec, launcher.prepare("same-job", None, None)))
    try:
        assert ours.find_orphans() == ["same-job"] and theirs.find_orphans() == ["same-job"]
        ours.kill_orphan("same-job")
        wait_until(lambda: builds[0]._proc.poll() is not None, timeout=5)
        assert builds[1]._proc.poll() is None  # the other deployment's build runs on
        assert theirs.find_orphans() == ["same-job"] and ours.find_orphans() == []
    finally:
        for build in builds:
            build.close()


def deployment(standin: Path, db: int, state_dir: Path, log: Path) -> dict[str, str]:
    env = base_env(db, f"t{uuid.uuid4().hex[:8]}", BUILDQ_BUILDCTL_PATH=str(standin))
    env["BUILDQ_LOCAL_STATE_DIR"] = str(state_dir)  # shared by both: one host
    env["STANDIN_LOG"] = str(log)
    flush_dbs(env)
    return env


def test_workers_of_another_deployment_never_touch_running_builds(
    standin, context_dir, tmp_path, start_worker
) -> None:
    state = tmp_path / "shared-state"
    one = deployment(standin, 2, state, tmp_path / "one.jsonl")
    two = deployment(standin, 4, state, tmp_path / "two.jsonl")
    start_worker(one, concurrency=1)
    slow = scenario(kind="succeed", sleep_s=4)
    handle = client_for(one).submit(
        {"context": str(context_dir), "tags": ["reg/one:1"], "build_args": {"STANDIN_SCENARIO": slow}}
    )
    wait_until(lambda: StandinLog(tmp_path / "one.jsonl").starts(), timeout=30)
    other = start_worker(two, concurrency=1)  # its start-up reaper reads the same state dir
    other.stop()
    start_worker(two, concurrency=1)
    other_job = client_for(two).submit({"context": str(context_dir), "tags": ["reg/two:1"]})
    assert other_job.wait(timeout=60)["state"] == "succeeded"
    record = handle.wait(timeout=60)
    assert record["state"] == "succeeded" and len(record["attempts"]) == 1
    assert [e["outcome"] for e in StandinLog(tmp_path / "one.jsonl").ends()] == ["succeeded"]


@pytest.mark.docker
def test_docker_reaper_sees_only_its_own_deployments_containers(
    docker_url, docker_job_id, build_context
) -> None:
    from buildq.launchers.docker import DockerLauncher
    from tests.conftest_docker import docker_settings_for
    from tests.standin.scenarios import hang, scenario_opt

    run = uuid.uuid4().hex[:8]  # another test run's deployments are not these
    ours = DockerLauncher(docker_settings_for(docker_url, deployment=f"deploy-a-{run}"))
    theirs = DockerLauncher(docker_settings_for(docker_url, deployment=f"deploy-b-{run}"))
    job = docker_job_id()
    paths = theirs.prepare(job, str(build_context), str(build_context))
    argv = ["build", "--frontend", "dockerfile.v0", "--local", f"context={paths.context_dir}",
            "--local", f"dockerfile={paths.dockerfile_dir}", "--output", "type=image,name=r/a:1,push=false",
            "--progress=rawjson", "--metadata-file", paths.metadata_file, *scenario_opt(hang())]  # fmt: skip
    spec = LaunchSpec(
        job_id=job, argv=argv, context_dir=str(build_context), dockerfile_dir=str(build_context)
    )
    build = theirs.start(spec, paths)
    try:
        assert job not in ours.find_orphans()
        ours.kill_orphan(job)
        assert job in theirs.find_orphans()
    finally:
        build.close()


# -- 2. fenced finish, retaken lease, rejected duplicates, janitor, TTLs -----------------------


def take(store: JobStore, job_id: str, *, domain: str = "host-a") -> Fence:
    """Claim ``job_id`` as a worker would for a message without a delivery id (a raw producer's)."""
    got = store.claim(job_id, delivery="", daemons=["tcp://d:1"], limit=1, ttl_s=30, worker="w:1",
                      domain=domain, body="{}", queue="q")  # fmt: skip
    assert isinstance(got, Claimed), got
    return Fence(job_id, got.token, got.gen)


def finish(store: JobStore, fence: Fence, state: str) -> bool:
    record = json.dumps({"job_id": fence.job_id, "state": state})
    return store.finish(fence, record=record, state=state)


def expire(r, job_id: str) -> None:
    """The holder's lease ran out."""
    r.hset(job_key(job_id), "lease_until", 0)


def test_a_stale_holder_cannot_store_its_result(r) -> None:
    store = JobStore(r, result_ttl_s=60)
    old = take(store, "fenced")
    expire(r, "fenced")  # the old lease was lost and another delivery took over
    new = take(store, "fenced", domain="host-b")
    assert finish(store, old, "failed") is False
    assert store.result("fenced") is None and store.lease_holder("fenced") == new.token
    expire(r, "fenced")  # even with the new holder's lease gone, the old claim is out
    assert finish(store, old, "failed") is False
    assert finish(store, new, "succeeded") is True
    assert store.result("fenced")["state"] == "succeeded"


def test_an_expired_lease_with_no_new_owner_is_taken_again(r) -> None:
    store = JobStore(r, result_ttl_s=60)
    mine = take(store, "blip")
    expire(r, "blip")  # expired during a Redis blip or a stalled scheduler
    assert store.renew(mine, ttl_s=30) == "ok"
    assert store.lease_holder("blip") == mine.token
    expire(r, "blip")  # expired again at the end: the result is still ours to store
    assert finish(store, mine, "succeeded") is True


def test_a_worker_that_rejects_a_job_never_overwrites_its_record(
    buildq_env, start_worker, standin_log
) -> None:
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    done = {"job_id": "dup-1", "state": "succeeded", "image": {"digest": "sha256:" + "a" * 64}}
    r.hset(job_key("dup-1"), "record", json.dumps(done))
    start_worker(buildq_env)
    job = {"job_id": "dup-1", "context": "/nonexistent/on/this/worker", "tags": ["reg/dup:1"]}
    queue = buildq_env["BUILDQ_QUEUE"]
    r.lpush(queue, raw_celery_message("dup-1", queue, {"job": job}))
    wait_until(lambda: r.llen(queue) == 0 and r.hlen("unacked") == 0, timeout=30)
    time.sleep(0.5)
    assert json.loads(r.hget(job_key("dup-1"), "record"))["state"] == "succeeded"
    assert standin_log.events() == []


def test_the_janitor_walks_the_whole_backlog_in_slices(r) -> None:
    store = JobStore(r, result_ttl_s=600)
    for i in range(450):  # lost between BRPOP and kombu's unacked record: in no queue
        job_id = f"lost-{i}"
        job = {"job_id": job_id, "context": "/ctx", "tags": ["r/a:1"]}
        message = build_message(job_id, "q-lost", job, delivery=f"d{i}", delivery_tag=f"t{i}")
        assert store.submit(job_id, queue="q-lost", message=message, tag=f"t{i}", delivery=f"d{i}",
                            body=json.dumps(job))  # fmt: skip
        r.delete("q-lost")
    r.sadd(QUEUES, "q-lost")
    later = float(r.time()[0]) + 100  # the jobs were submitted (server clock) 100 s before this
    janitor = Janitor(store, after_s=60, batch=200)
    seen = []
    for _ in range(3):
        seen.append(janitor.run_once(now=later))
        while message := r.rpop("q-lost"):  # the workers take what came back
            r.hset(UNACKED_KEY, json.loads(message)["properties"]["delivery_tag"], message)
    assert [len(s) for s in seen] == [200, 200, 50]
    assert len({job_id for s in seen for job_id in s}) == 450 and r.hlen(UNACKED_KEY) == 450
    assert requeue_lost(store, after_s=60, now=later) == []  # all delivered now: nothing twice
    r.delete(UNACKED_KEY)


def test_a_redelivery_waits_out_a_dead_holders_lease_and_takes_over(
    standin, standin_log, context_dir, tmp_path, monkeypatch
) -> None:
    """Celery redelivers at once when a pool process dies: the redelivery finds the dead holder's
    lease still live, waits it out (one lease TTL at most) and takes the job over (the lost run is
    recorded), instead of being acknowledged as a duplicate and leaving the job to the janitor (a
    raw producer's job, whose message buildq does not keep, would be lost)."""
    monkeypatch.setenv("STANDIN_LOG", str(standin_log.path))
    env = pool_env(19, "nl", standin, tmp_path / "state", BUILDQ_LEASE_TTL_S="1")
    with pool_runtime(env) as rt:
        r = rt.store.redis
        job = {"job_id": "raw-killed", "context": str(context_dir), "tags": ["reg/nl:1"]}
        r.lpush("nl", build_message("raw-killed", "nl", job, delivery="d-raw"))  # a raw producer's message
        delivery = deliver(r, "nl")
        dead = rt.store.claim("raw-killed", delivery="d-raw", daemons=["tcp://127.0.0.1:1234"],
                              limit=4, ttl_s=1.0, worker="dead:1", domain="elsewhere", body="{}",
                              queue="nl")  # fmt: skip
        assert isinstance(dead, Claimed)  # ... and its worker was SIGKILLed mid-build
        started = time.monotonic()
        ending = rt.lifecycle.handle(delivery)  # the redelivery of the same message
        assert 0.3 < time.monotonic() - started < 4.0
        assert ending.kind == "finished" and ending.record is not None
        assert ending.record["state"] == "succeeded"
        assert [a["outcome"] for a in ending.record["attempts"]] == ["lost", "succeeded"]
        assert len(standin_log.starts()) == 1


def test_a_duplicate_of_a_live_build_is_dropped_after_one_lease_ttl(
    standin, standin_log, context_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("STANDIN_LOG", str(standin_log.path))
    env = pool_env(19, "nl", standin, tmp_path / "state", BUILDQ_LEASE_TTL_S="1")
    with pool_runtime(env) as rt:
        client = client_for(env)
        client.submit({"job_id": "live-1", "context": str(context_dir), "tags": ["reg/nl:2"]})
        delivery = deliver(rt.store.redis, "nl")
        live = rt.store.claim("live-1", delivery=delivery.delivery, daemons=["tcp://127.0.0.1:1234"],
                              limit=4, ttl_s=1.0, worker="live:1", domain="elsewhere", body="{}",
                              queue="nl")  # fmt: skip
        assert isinstance(live, Claimed)
        fence = Fence("live-1", live.token, live.gen)

        def renew() -> None:  # the live holder renews its lease as its build goes on
            rt.store.renew(fence, ttl_s=1.0)

        renewing = rt.scheduler.every(0.2, renew)
        try:
            started = time.monotonic()
            ending = rt.lifecycle.handle(delivery)  # a duplicate while the build runs elsewhere
            waited = time.monotonic() - started
        finally:
            renewing.cancel()
        assert (ending.kind, ending.reason) == ("dropped", "job live-1: another delivery runs it")
        assert 1.5 <= waited < 4.0  # one lease TTL (and a margin), not for the whole build
        assert rt.store.lease_holder("live-1") == live.token and standin_log.starts() == []


def test_every_job_key_expires(r) -> None:
    """Whatever a job goes through, every key it leaves behind expires (the shared indexes and the
    queue aside)."""
    store = JobStore(r, result_ttl_s=600)
    first = take(store, "lpush-only")  # a producer that only LPUSHes: the claim creates the hash
    assert 0 < r.ttl(job_key("lpush-only")) <= 600
    assert store.renew(first, ttl_s=30, phase="build") == "ok"
    assert store.requeue(first, queue="q", message=b"next", tag="t2", delivery="d2",
                         phase="retry_wait", attempts=[{"number": 1}], window_start=1.0, waiting_since=None,
                         avoid="tcp://d:1")  # fmt: skip
    second = store.claim("lpush-only", delivery="d2", daemons=["tcp://d:1"], limit=1,
                         ttl_s=30, worker="w:2", domain="host-a", body="{}", queue="q",
                         cache_key="r/a:cache")  # fmt: skip
    assert isinstance(second, Claimed)
    assert store.finish(Fence("lpush-only", second.token, second.gen), record='{"state":"succeeded"}',
                        state="succeeded", log=LogEnd(2, "efinal: succeeded", 100, False, 300),
                        remember=("r/a:cache", "tcp://d:1"),
                        baseline=("buildq:baseline:r/a:cache", b"{}", 5, 900))  # fmt: skip
    assert store.reject("raw-invalid", delivery="", record='{"state":"failed"}')
    store.request_cancel("cancelled-before-submit")
    shared = {JOBS_INDEX, "q", "buildq:loads"}
    shared |= {k.decode() for k in r.scan_iter("buildq:load:*")}
    keys = sorted(k.decode() for k in r.scan_iter("*"))
    assert "buildq:job:raw-invalid" in keys and "buildq:log:lpush-only" in keys
    assert {k: r.ttl(k) for k in keys if k not in shared and r.ttl(k) < 0} == {}


def test_scratch_directories_of_gone_processes_are_removed(
    standin, context_dir, tmp_path, start_worker
) -> None:
    env = deployment(standin, 6, tmp_path / "state", tmp_path / "log.jsonl")
    worker = start_worker(env, concurrency=2)
    client = client_for(env)
    for i in range(4):
        assert (
            client.submit({"context": str(context_dir), "tags": [f"reg/s{i}:1"]}).wait(timeout=60)["state"]
            == "succeeded"
        )
    assert list((tmp_path / "state").glob("run-*"))
    children = worker.children()
    worker.stop()
    left = [p for p in (tmp_path / "state").glob("run-*") if int(p.name.split("-")[1]) in children]
    assert left == []


# -- 3. Redis restarted under load -------------------------------------------------------------


def test_chaos_redis_restarted_ten_times_under_fifty_builds(
    standin, context_dir, tmp_path, start_worker, standin_log
) -> None:
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()

    def start() -> None:
        start_redis_server(port, "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec",
                           "--save", "", "--pidfile", str(data / "redis.pid"))  # fmt: skip

    def restart() -> None:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown"], capture_output=True)
        wait_until(
            lambda: (
                subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0
            ),
            timeout=10,
        )
        time.sleep(0.3)
        start()

    start()
    try:
        env = base_env(0, f"chaos{uuid.uuid4().hex[:6]}", BUILDQ_BUILDCTL_PATH=str(standin))
        env.update({
            "BUILDQ_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "BUILDQ_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1",
            "BUILDQ_REQUEUE_LOST_AFTER_S": "3",
            "BUILDQ_LOCAL_STATE_DIR": str(tmp_path / "state"),
            "STANDIN_LOG": str(standin_log.path),
        })  # fmt: skip
        start_worker(env, concurrency=2)
        start_worker(env, concurrency=2)
        client = client_for(env)
        rng = random.Random(13)
        handles = []
        restarts = 0
        for i in range(50):
            spec = scenario(kind="succeed", sleep_s=round(rng.uniform(0.1, 1.5), 2))
            job = {"context": str(context_dir), "tags": [f"reg/chaos{i}:1"], "job_id": f"chaos-{i}",
                   "build_args": {"STANDIN_SCENARIO": spec}}  # fmt: skip
            handles.append(submit_retrying(client, job))
            if i % 5 == 4:
                time.sleep(rng.uniform(0.0, 1.0))
                restart()
                restarts += 1
        records = {h: wait_retrying(client, h, timeout=240) for h in handles}
        states = collections.Counter(rec["state"] for rec in records.values())
        starts, ends = standin_log.starts(), standin_log.ends()
        succeeded = collections.Counter(e["key"] for e in ends if e["outcome"] == "succeeded")
        overlaps = overlapping_runs(standin_log.events())
        print(f"\nchaos: builds=50 redis_restarts={restarts} states={dict(states)}"
              f" buildctl_runs={len(starts)} succeeded_runs={sum(succeeded.values())}"
              f" concurrent_duplicates={len(overlaps)}")  # fmt: skip
        assert states == {"succeeded": 50}
        assert overlaps == []
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)


def overlapping_runs(events: list[dict[str, Any]]) -> list[str]:
    """Keys that had two buildctl runs at the same time.

    A run that logged its end spans [start, end]. A run with no end was SIGKILLed: by the next
    delivery of its job before that one started (a dead worker's orphan) or at its close; it must
    be dead now, and it spans [start, next start of the same job]."""
    runs: dict[int, dict[str, Any]] = {}
    for e in events:
        if "debug" in (e.get("argv") or []):
            continue
        run = runs.setdefault(e["pid"], {"key": e.get("key"), "pid": e["pid"]})
        run[e["event"]] = e.get("started") if e["event"] == "start" else e.get("ended")
    by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for run in runs.values():
        if "start" in run:
            by_key[run["key"]].append(run)
    bad = []
    for key, spans in by_key.items():
        spans.sort(key=lambda run: run["start"])
        for one, nxt in zip(spans, spans[1:], strict=False):
            if "end" not in one:
                alive = os.path.exists(f"/proc/{one['pid']}")
                assert not alive, f"buildctl {one['pid']} of {key} left running"
            elif nxt["start"] < one["end"]:
                bad.append(key)
    return bad
