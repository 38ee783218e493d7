"""Redis Sentinel: broker, result backend and buildq's keys follow the master; a SIGKILLed master
mid-run loses no build and runs none twice at once (real redis-server and sentinel processes)."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.celeryapp.app import celery_config
from buildq.config import SettingsError, load_settings, same_redis
from buildq.errors import NotReplicatedError
from buildq.store.connect import parse_sentinel_url
from buildq.store.scripts import Replicas
from tests.conftest import scenario
from tests.harness import RETRYABLE as HARNESS_RETRYABLE
from tests.harness import base_env, client_for
from tests.sentinels import MASTER_NAME, SentinelSetup
from tests.test_no_loss import overlapping_runs

URL = "sentinel://:pw@h1:26379/2;sentinel://h2:26380/2;sentinel://h3"


def test_a_sentinel_url_names_the_sentinels_and_the_masters_db_and_password() -> None:
    address = parse_sentinel_url(URL)
    assert address.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (address.db, address.password) == (2, "pw")
    with pytest.raises(ValueError, match="not a sentinel"):
        parse_sentinel_url("sentinel://h1;redis://h2")


def test_sentinel_urls_need_the_master_name() -> None:
    with pytest.raises(SettingsError, match="BUILDQ_SENTINEL_MASTER is required .*BUILDQ_BROKER_URL"):
        load_settings({"BUILDQ_BROKER_URL": URL})


def test_celery_and_buildq_follow_the_same_master() -> None:
    env = {"BUILDQ_BROKER_URL": URL, "BUILDQ_RESULT_BACKEND": URL.replace("/2", "/3"),
           "BUILDQ_SENTINEL_MASTER": "main", "BUILDQ_SENTINEL_PASSWORD": "sentinel-secret"}  # fmt: skip
    settings = load_settings(env)
    config = celery_config(settings)
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["master_name"] == "main"  # type: ignore[index]
        assert options["sentinel_kwargs"] == {"password": "sentinel-secret"}  # type: ignore[index]
    # the state Redis is the broker's master and DB: one-round-trip submit and atomic hand-back apply
    assert settings.state_redis_url == URL
    assert same_redis(settings.state_redis_url, "sentinel://h9:1/2")
    assert not same_redis(settings.state_redis_url, "sentinel://h1/3")
    # BUILDQ_REDIS_URL may spell the broker's master and DB another way, never another DB
    other_sentinels = load_settings({**env, "BUILDQ_REDIS_URL": "sentinel://h9:1/2"})
    assert other_sentinels.state_redis_url == "sentinel://h9:1/2"
    with pytest.raises(SettingsError, match="BUILDQ_REDIS_URL must name the broker's Redis and DB"):
        load_settings({**env, "BUILDQ_REDIS_URL": "sentinel://h1/3"})
    # the deployment is the master and DB, whichever sentinels are listed
    shuffled = load_settings({**env, "BUILDQ_BROKER_URL": "sentinel://h3/2;sentinel://h1:26379/2"})
    assert shuffled.deployment_id == settings.deployment_id
    assert "sentinel-secret" not in repr(settings)


class FakeInfo:
    def __init__(self) -> None:
        self.replicas = 1

    def info(self, section: str) -> dict[str, int]:
        return {"connected_slaves": self.replicas}


def test_by_default_a_write_waits_for_one_replica_while_there_is_one() -> None:
    source, now = FakeInfo(), [0.0]
    replicas = Replicas(source, wanted=None, timeout_s=1, refresh_s=5, clock=lambda: now[0])
    assert replicas.target() == 1 and not replicas.short(1, 1) and replicas.short(0, 1)
    source.replicas = 0  # a failover left the new master alone: nothing to wait for
    assert replicas.target() == 1  # known for refresh_s ...
    assert not replicas.short(0, 1)  # ... but a short WAIT asks again
    assert replicas.target() == 0
    assert Replicas(source, wanted=2, timeout_s=1).short(1, 2)


@pytest.fixture
def sentinels(tmp_path: Path) -> Any:
    setup = SentinelSetup(tmp_path / "redis").start()
    yield setup
    setup.stop()


def sentinel_env(setup: SentinelSetup, standin: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = base_env(0, f"s{uuid.uuid4().hex[:6]}", BUILDQ_BUILDCTL_PATH=str(standin))
    env.update({
        "BUILDQ_BROKER_URL": setup.url(0),
        "BUILDQ_RESULT_BACKEND": setup.url(1),
        "BUILDQ_SENTINEL_MASTER": MASTER_NAME,
        "BUILDQ_LOCAL_STATE_DIR": str(tmp_path / "state"),
        **extra,
    })  # fmt: skip
    return env


def test_a_submission_is_acknowledged_only_once_a_replica_has_it(
    sentinels, standin, context_dir, tmp_path
) -> None:
    env = sentinel_env(sentinels, standin, tmp_path, BUILDQ_REPLICA_WAIT_TIMEOUT_S="0.5")
    client = client_for(env)
    client.submit({"context": str(context_dir), "tags": ["reg/a:1"], "job_id": "replicated"})
    replica = redis.Redis(port=sentinels.replica_port)
    assert replica.hget("buildq:job:replicated", "state") == b"queued"  # already there, no sleep
    pid = int(replica.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)  # the replica stops confirming
    try:
        with pytest.raises(NotReplicatedError, match="job stalled is queued on the Redis master but 0 of 1"):
            client.submit({"context": str(context_dir), "tags": ["reg/a:1"], "job_id": "stalled"})
    finally:
        os.kill(pid, signal.SIGCONT)


def test_sigkill_of_the_master_under_fifty_plain_submits_loses_none_and_doubles_none(
    sentinels, standin, context_dir, tmp_path, start_worker, standin_log
) -> None:
    """Producers that do not retry by themselves — half through the CLI, half through BuildqClient —
    submit 50 builds; the master is SIGKILLed after the 25th. Every submit returns success (the
    client rides through the failover: BUILDQ_REDIS_RETRY_S), every build succeeds, none twice at once."""
    from tests.harness import run_cli

    env = sentinel_env(sentinels, standin, tmp_path, BUILDQ_REQUEUE_LOST_AFTER_S="3",
                       STANDIN_LOG=str(standin_log.path))  # fmt: skip
    start_worker(env, concurrency=2)
    start_worker(env, concurrency=2)
    client = client_for(env)
    rng = random.Random(17)
    handles: list[str] = []
    killed_at: float | None = None
    first_submit_after: float | None = None
    failover: list[float] = []
    for i in range(50):
        spec = scenario(kind="succeed", sleep_s=round(rng.uniform(0.1, 1.5), 2))
        job = {"context": str(context_dir), "tags": [f"reg/sentinel{i}:1"], "job_id": f"sentinel-{i}",
               "build_args": {"STANDIN_SCENARIO": spec}}  # fmt: skip
        if i % 2:
            handles.append(client.submit(job).job_id)  # a plain call: no retry of the producer's own
        else:
            done = run_cli(env, "submit", "--job-file", "-", stdin=json.dumps(job), timeout=120)
            assert done.returncode == 0, done.stderr
            handles.append(done.stdout.strip())
        if killed_at is not None and first_submit_after is None:
            first_submit_after = time.time() - killed_at
        if i == 24:  # midway: builds running, others queued
            time.sleep(0.5)
            killed_at = time.time()
            sentinels.kill_master()
            watcher = threading.Thread(target=lambda t=killed_at: failover.append(sentinels.wait_failover(t)))
            watcher.start()
        else:
            time.sleep(rng.uniform(0.0, 0.2))
    watcher.join()
    assert killed_at is not None and first_submit_after is not None and failover
    try:
        records = {h: client.wait(h, timeout=60) for h in handles}
    except TimeoutError:
        r = client.store.redis
        for h in handles:
            d = r.hgetall(f"buildq:job:{h}")
            if b"record" not in d:
                print("DEBUG", h, {k: v[:200] for k, v in d.items() if k != b"job"})
        print("DEBUG queues", {q: r.lrange(q, 0, -1) for q in r.smembers("buildq:queues")})
        print("DEBUG unacked", r.hkeys("unacked"), r.zrange("unacked_index", 0, -1, withscores=True))
        print("DEBUG time", r.time())
        raise
    states = collections.Counter(rec["state"] for rec in records.values())
    last_done = max(_epoch(rec["finished_at"]) for rec in records.values())
    starts = standin_log.starts()
    overlaps = overlapping_runs(standin_log.events())
    print(f"\nsentinel failover: builds=50 states={dict(states)} buildctl_runs={len(starts)}"
          f" concurrent_duplicates={len(overlaps)} failover_s={failover[0]:.2f}"
          f" first_submit_after_kill_s={first_submit_after:.2f}"
          f" last_result_after_kill_s={last_done - killed_at:.2f}")  # fmt: skip
    assert states == {"succeeded": 50}
    assert overlaps == []
    assert sentinels.master_addr() == ("127.0.0.1", sentinels.replica_port)


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


RETRYABLE = (*HARNESS_RETRYABLE, NotReplicatedError)
