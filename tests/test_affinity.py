"""Builds go where their cache is (cache-affinity routing across BuildKit daemons).

Pure parts over data, the claim and finish scripts against a real Redis, the lifecycle's wait for
a full remembered daemon in this process (a real pool runtime, the stand-in), and whole builds
through real workers against two of the stand-in's simulated daemons, whose local caches decide
whether a rebuild replays warm (all steps CACHED), regwarm (cache imported from the registry) or cold.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.cli.views import render_record
from buildq.client import BuildqClient
from buildq.contract.job import BuildJob, cache_key
from buildq.engine.recording import routing_reason
from buildq.engine.runtime import PoolRuntime
from buildq.store.daemons import DaemonHealth
from buildq.store.jobs import Claimed, Fence, JobStore
from buildq.store.keys import affinity_key, job_key, load_key
from tests.conftest import scenario
from tests.harness import (
    REDIS_URL,
    CountingRedis,
    StandinLog,
    client_for,
    counting_client,
    free_port,
    simulated_deployment,
    wait_until,
)
from tests.inprocess import deliver, pool_env, pool_runtime
from tests.standin.scenarios import daemon_down, daemon_invocations
from tests.test_observability import scrape

A, B = "tcp://127.0.0.1:1234", "tcp://127.0.0.1:1236"
DB_URL = f"{REDIS_URL}/13"


# -- pure ------------------------------------------------------------------------------------


def test_the_cache_key_is_the_cache_ref_spelled_out() -> None:
    def key(**job: Any) -> str:
        return cache_key(BuildJob.model_validate({"context": "/srv/app", **job}))

    assert key(tags=["registry:5000/team/app:1"]) == "registry:5000/team/app:buildcache"
    assert key(tags=["registry:5000/team/app:2", "x/y:1"]) == "registry:5000/team/app:buildcache"
    assert key(tags=["reg:5000/a:1"], cache_ref="reg:5000/cache/a:main") == "reg:5000/cache/a:main"
    # one cache location, one key, however it is written
    assert key(tags=["app:1"]) == "docker.io/library/app:buildcache"
    assert key(tags=["x:1"], cache_ref="index.docker.io/team/app") == "docker.io/team/app:latest"
    assert key(tags=["x:1"], cache_ref="team/app:latest") == "docker.io/team/app:latest"


def test_the_routing_reason_follows_from_the_remembered_and_the_chosen_daemon() -> None:
    assert routing_reason(None, A) == "least_loaded"  # nothing remembered (or affinity off)
    assert routing_reason(A, A) == "affinity"
    assert routing_reason(A, B) == "fallback"  # remembered one down, full past the wait, or avoided
    assert routing_reason(A, None) is None and routing_reason(None, None) is None  # no daemon chosen


def test_buildq_status_shows_the_daemon_and_why() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    render_record({"job_id": "j", "state": "succeeded", "daemon": A, "routing": "affinity"}, console)
    assert f"daemon  {A} (affinity)" in console.export_text()


# -- claim, finish and the wait against Redis ------------------------------------------------


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


@pytest.fixture
def store(client: CountingRedis) -> JobStore:
    return JobStore(client, result_ttl_s=60)


KEY = "reg/app:buildcache"


def take(store: JobStore, job_id: str, **kw: Any) -> Claimed:
    """Claim ``job_id`` (a raw producer's message) with its slot, as the lifecycle does."""
    options: dict[str, Any] = {
        "daemons": [A, B], "limit": 2, "ttl_s": 30, "cache_key": KEY, "affinity_wait": True,
        "worker": "w:1", "domain": "host", "body": "{}", "queue": "q",
    }  # fmt: skip
    got = store.claim(job_id, delivery="", **{**options, **kw})
    assert isinstance(got, Claimed), got
    return got


def finish(store: JobStore, job_id: str, daemon: str | None, state: str, remember: str | None) -> bool:
    got = take(store, job_id, daemons=[daemon] if daemon else [A], cache_key=None)
    record = json.dumps({"job_id": job_id, "state": state})
    return store.finish(Fence(job_id, got.token, got.gen), record=record, state=state,
                        remember=(remember, daemon) if remember and daemon else None)  # fmt: skip


def test_a_success_remembers_its_daemon_in_the_finish_round_trip(store, client) -> None:
    finish(store, "warm", None, "failed", None)  # loads the scripts
    got = take(store, "f1", daemons=[B], cache_key=None)
    client.calls.clear()
    record = json.dumps({"job_id": "f1", "state": "succeeded"})
    assert store.finish(Fence("f1", got.token, got.gen), record=record, state="succeeded", remember=(KEY, B))
    assert client.calls == ["EVALSHA"]
    assert client.get(affinity_key(KEY)) == B.encode()
    assert 0 < client.ttl(affinity_key(KEY)) <= 60  # remembered as long as a result is kept
    assert finish(store, "f2", A, "failed", KEY)
    assert finish(store, "f3", A, "succeeded", None)
    assert finish(store, "f4", None, "succeeded", KEY)
    assert client.get(affinity_key(KEY)) == B.encode()  # neither a failure nor no daemon changes it


def test_the_claim_prefers_the_remembered_daemon_in_its_one_round_trip(store, client) -> None:
    first = take(store, "j0")  # nothing remembered: the least loaded (A, first in the rotation)
    assert (first.daemon, first.preferred, first.preferred_full) == (A, None, False)
    client.set(affinity_key(KEY), B)
    client.calls.clear()
    got = take(store, "j1")
    assert client.calls == ["EVALSHA"]
    assert (got.daemon, got.preferred) == (B, B)
    assert routing_reason(got.preferred, got.daemon) == "affinity"
    # B is more loaded than A now (1 against 1, then 2 against 1), still preferred while it has room
    assert take(store, "j2").daemon == B
    index = load_key([A, B])
    assert client.zscore(index, B) == 2 and client.zscore(index, A) == 1


def test_a_full_remembered_daemon_takes_nothing_so_the_caller_can_wait(store, client) -> None:
    client.set(affinity_key(KEY), B)
    store.register_daemons([A, B])
    client.zadd(load_key([A, B]), {B: 2})  # full (limit 2)
    got = take(store, "j1")
    assert (got.daemon, got.preferred, got.preferred_full) == (None, B, True)
    assert client.zscore(load_key([A, B]), A) == 0  # no slot held while waiting
    # without the wait (BUILDQ_AFFINITY_WAIT_S=0) it falls back at once
    at_once = take(store, "j2", affinity_wait=False)
    assert (at_once.daemon, at_once.preferred, at_once.preferred_full) == (A, B, False)
    assert routing_reason(at_once.preferred, at_once.daemon) == "fallback"


def test_a_down_or_avoided_remembered_daemon_falls_back_never_to_a_down_one(store, client) -> None:
    client.set(affinity_key(KEY), B)
    health = DaemonHealth(client)
    health.mark_down(B, "refused", 1.0)
    got = take(store, "j1")
    assert (got.daemon, got.preferred, got.preferred_full) == (A, B, False)
    health.mark_down(A, "refused", 1.0)
    assert take(store, "j2").daemon is None  # every daemon down: nothing
    health.mark_up(A, 2.0)
    health.mark_up(B, 2.0)
    # a retry after B dropped its connection avoids B even though B built the cache (the worker
    # that requeued it wrote the daemon to avoid into the job's hash)
    client.hset(job_key("j3"), "avoid", B)
    retry = take(store, "j3")
    assert (retry.daemon, routing_reason(retry.preferred, retry.daemon)) == (A, "fallback")


def test_a_remembered_daemon_no_longer_configured_and_affinity_off_are_least_loaded(store, client) -> None:
    client.set(affinity_key(KEY), "tcp://gone:1234")
    got = take(store, "j1")
    assert (got.daemon, got.preferred) == (A, None)
    client.set(affinity_key(KEY), B)
    off = take(store, "j2", cache_key=None)  # BUILDQ_CACHE_AFFINITY=false
    assert off.preferred is None and off.daemon == B  # least loaded: A holds j1
    assert routing_reason(off.preferred, off.daemon) == "least_loaded"


# -- the lifecycle's wait for a full remembered daemon (in this process, real time) -----------


@pytest.fixture
def pool(tmp_path: Path, standin: Path, standin_log: StandinLog, monkeypatch) -> Iterator[Any]:
    """``pool(**settings)``: a pool runtime on daemons A and B (one build each), affinity on."""
    monkeypatch.setenv("STANDIN_LOG", str(standin_log.path))
    made: list[Any] = []

    def make(**settings: Any) -> PoolRuntime:
        env = pool_env(17, "aff", standin, tmp_path / "state", BUILDQ_BUILDKIT_HOSTS=f"{A},{B}",
                       BUILDQ_BUILDKIT_MAX_BUILDS="1")  # fmt: skip
        made.append(pool_runtime(env, **settings))
        return made[-1].__enter__()

    yield make
    for context in made:
        context.__exit__(None, None, None)


#: the cache key of the jobs :func:`handle` submits (tag ``reg:5000/app:1``)
HOME_KEY = "reg:5000/app:buildcache"


def handle(rt: PoolRuntime, context_dir: Path, job_id: str) -> tuple[Any, float]:
    """Submit a job of the repository whose cache B holds and handle its delivery: (ending, seconds)."""
    job = {"job_id": job_id, "context": str(context_dir), "tags": ["reg:5000/app:1"]}
    assert cache_key(BuildJob.model_validate(job)) == HOME_KEY
    BuildqClient(rt.settings).submit(job)
    delivery = deliver(rt.store.redis, "aff")
    started = time.monotonic()
    ending = rt.lifecycle.handle(delivery)
    return ending, time.monotonic() - started


def test_the_wait_for_the_remembered_daemon_never_passes_the_setting(pool, context_dir) -> None:
    rt, no_wait = pool(affinity_wait_s=1.0), pool(affinity_wait_s=0.0)  # one deployment, two settings
    r = rt.store.redis
    r.set(affinity_key(HOME_KEY), B)
    rt.store.register_daemons([A, B])
    r.zadd(load_key([A, B]), {B: 1})  # B stays full; A is free all along
    ending, seconds = handle(rt, context_dir, "t1")
    assert 1.0 <= seconds < 2.5  # polled B for the setting, then fell back
    record = ending.record
    assert record["state"] == "succeeded" and (record["daemon"], record["routing"]) == (A, "fallback")
    assert record["phases"]["queued"] >= 0.9
    r.set(affinity_key(HOME_KEY), B)  # t1 succeeded on A: remembered there now; B again
    ending, seconds = handle(no_wait, context_dir, "t2")  # BUILDQ_AFFINITY_WAIT_S=0: no wait at all
    assert seconds < 0.9 and (ending.record["daemon"], ending.record["routing"]) == (A, "fallback")


def test_the_remembered_daemon_is_taken_when_it_frees_within_the_wait(pool, context_dir) -> None:
    rt = pool(affinity_wait_s=2.0)
    r = rt.store.redis
    r.set(affinity_key(HOME_KEY), B)
    rt.store.register_daemons([A, B])
    r.zadd(load_key([A, B]), {B: 1})
    threading.Timer(0.5, lambda: r.zincrby(load_key([A, B]), -1, B)).start()
    ending, seconds = handle(rt, context_dir, "t1")
    assert 0.5 <= seconds < 2.0  # A had room all along: it waited for B instead
    assert (ending.record["daemon"], ending.record["routing"]) == (B, "affinity")


def test_after_the_affinity_wait_the_ordinary_wait_has_only_what_is_left(pool, context_dir) -> None:
    rt = pool(affinity_wait_s=1.0)
    rt.lifecycle.slot_wait_s = 2.0
    r = rt.store.redis
    r.set(affinity_key(HOME_KEY), B)
    rt.store.register_daemons([A, B])
    r.zadd(load_key([A, B]), {A: 1, B: 1})  # everything full
    ending, seconds = handle(rt, context_dir, "t1")
    assert (ending.kind, ending.reason) == ("requeued", "waiting_for_daemon")  # back to the queue
    assert 2.0 <= seconds < 2.9  # 1 s for B, then 1 s for any: the usual wait in all


# -- whole builds through real workers -------------------------------------------------------


def deployment(standin: Path, db: int, daemons_dir: Path, **extra: str) -> dict[str, str]:
    return simulated_deployment(standin, db, daemons_dir, f"{A},{B}", **extra)


def job(context_dir: Path, project: str, sleep_s: float = 0.0) -> dict[str, Any]:
    spec = scenario(kind="succeed", sleep_s=sleep_s) if sleep_s else scenario(kind="succeed")
    return {
        "context": str(context_dir),
        "tags": [f"reg/{project}:1"],
        "build_args": {"STANDIN_SCENARIO": spec},
    }


def variants(daemons_dir: Path) -> list[tuple[str, str, str]]:
    """(daemon, cache key, variant) of every build the simulated daemons ran, in order."""
    runs = [
        (e["t"], addr, e["key"], e["variant"])
        for addr in (A, B)
        for e in daemon_invocations(daemons_dir, addr)
        if e["cmd"] == "build" and e["outcome"] == "succeeded"
    ]
    return [(addr, key, variant) for _, addr, key, variant in sorted(runs)]


def test_rebuilds_go_to_the_daemon_that_built_them_and_hit_its_cache(
    standin, context_dir, tmp_path, start_worker
) -> None:
    daemons = tmp_path / "daemons"
    env = deployment(standin, 2, daemons)
    start_worker(env, concurrency=2)
    client = client_for(env)
    projects = [f"p{i}" for i in range(4)]
    first = {p: client.submit(job(context_dir, p)).wait(timeout=60) for p in projects}
    assert all(r["routing"] == "least_loaded" for r in first.values())
    rebuilds = [client.submit(job(context_dir, p)).wait(timeout=60) for _ in range(2) for p in projects]
    for project, record in zip(projects * 2, rebuilds, strict=True):
        assert record["state"] == "succeeded", record.get("error")
        last = record["attempts"][-1]
        assert last["routing"] == record["routing"] == "affinity"
        assert last["daemon"] == record["daemon"] == first[project]["daemon"]
        assert record["steps"]["cached"] == record["steps"]["total"]  # the daemon's local cache
    runs = variants(daemons)
    assert [v for _, _, v in runs[:4]] == ["cold"] * 4 and [v for _, _, v in runs[4:]] == ["warm"] * 8


def test_with_affinity_off_nothing_is_remembered(standin, context_dir, tmp_path, start_worker) -> None:
    daemons = tmp_path / "daemons"
    env = deployment(standin, 4, daemons, BUILDQ_CACHE_AFFINITY="false")
    start_worker(env, concurrency=2)
    client = client_for(env)
    records = [client.submit(job(context_dir, "off")).wait(timeout=60) for _ in range(3)]
    assert all(r["state"] == "succeeded" and r["routing"] == "least_loaded" for r in records)
    assert redis.Redis.from_url(env["BUILDQ_BROKER_URL"]).keys("buildq:affinity:*") == []


def test_a_rebuild_falls_back_when_its_daemon_is_down(standin, context_dir, tmp_path, start_worker) -> None:
    daemons = tmp_path / "daemons"
    env = deployment(standin, 6, daemons)
    start_worker(env, concurrency=2)
    client = client_for(env)
    home = client.submit(job(context_dir, "down")).wait(timeout=60)["daemon"]
    other = B if home == A else A
    daemon_down(daemons, home, 120.0)
    record = client.submit(job(context_dir, "down")).wait(timeout=60)
    assert record["state"] == "succeeded", record.get("error")
    *refused, last = record["attempts"]
    # the breaker opens at the first refused dial (no attempt used); then it goes elsewhere
    assert all(a["daemon"] == home and a["reached_daemon"] is False for a in refused)
    assert (last["daemon"], last["routing"], record["routing"]) == (other, "fallback", "fallback")
    assert variants(daemons)[-1] == (other, "reg/down:buildcache", "regwarm")  # the registry's cache
    # the daemon that built it last is remembered, so the next rebuild stays there
    again = client.submit(job(context_dir, "down")).wait(timeout=60)
    assert (again["daemon"], again["routing"]) == (other, "affinity")


def test_a_rebuild_waits_briefly_for_its_full_daemon_then_falls_back(
    standin, context_dir, tmp_path, start_worker
) -> None:
    daemons = tmp_path / "daemons"
    env = deployment(standin, 8, daemons, BUILDQ_BUILDKIT_MAX_BUILDS="1", BUILDQ_AFFINITY_WAIT_S="1")
    start_worker(env, concurrency=2)
    client = client_for(env)
    home = client.submit(job(context_dir, "full")).wait(timeout=60)["daemon"]
    long = client.submit(job(context_dir, "full", sleep_s=8.0))  # takes home's only slot
    wait_until(lambda: client.status(long.job_id).get("state") == "running", timeout=30)
    record = client.submit(job(context_dir, "full")).wait(timeout=60)
    assert record["state"] == "succeeded", record.get("error")
    assert record["routing"] == "fallback" and record["daemon"] != home
    assert record["phases"]["queued"] >= 0.9  # it did wait for home first
    assert client.status(long.job_id).get("state") == "running"  # but not for home to free up
    long_record = long.wait(timeout=60)
    assert (long_record["daemon"], long_record["routing"]) == (home, "affinity")


def test_routing_reasons_are_counted_in_prometheus(standin, context_dir, tmp_path, start_worker) -> None:
    port = free_port()
    daemons = tmp_path / "daemons"
    env = deployment(
        standin, 12, daemons, BUILDQ_METRICS_PORT=str(port), BUILDQ_METRICS_DIR=str(tmp_path / "prom")
    )
    start_worker(env, concurrency=2)
    client = client_for(env)
    for project in ("m1", "m1", "m1", "m2"):
        assert client.submit(job(context_dir, project)).wait(timeout=60)["state"] == "succeeded"
    least = 'buildq_routing_total{reason="least_loaded"}'
    samples = wait_until(
        lambda: (s := scrape(port)).get(least) == 2.0 and s, timeout=10
    )  # written after the result
    assert samples['buildq_routing_total{reason="affinity"}'] == 2.0
    assert samples['buildq_routing_total{reason="fallback"}'] == 0.0  # known from the start, at 0
