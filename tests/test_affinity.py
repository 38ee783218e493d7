"""Builds go where their cache is (cache-affinity routing across BuildKit daemons).

Pure parts over data, the claim and finish scripts and the slow path's wait against a real Redis
(with an injected clock), and whole builds through real workers against two of the stand-in's
simulated daemons, whose local caches decide whether a rebuild replays warm (all steps CACHED),
regwarm (cache imported from the registry) or cold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.cli.views import render_record
from buildq.contract.job import BuildJob, cache_key
from buildq.records import routing_reason
from buildq.store.claim import claim, finish
from buildq.store.daemons import DaemonHealth
from buildq.store.jobs import JobStore
from buildq.store.keys import affinity_key, slot_key
from buildq.store.slots import DaemonSlots, wait_for_slot_preferring
from tests.conftest import scenario
from tests.harness import (
    REDIS_URL,
    CountingRedis,
    client_for,
    counting_client,
    free_port,
    simulated_deployment,
    wait_until,
)
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


@pytest.fixture
def slots(store: JobStore) -> DaemonSlots:
    return DaemonSlots(store.scripts)


KEY = "reg/app:buildcache"


def take(store: JobStore, slots: DaemonSlots, job_id: str, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "daemons": [A, B],
        "limit": 2,
        "ttl_s": 30,
        "prefer": 0,
        "give_up_after_s": 0,
        "cache_key": KEY,
        "affinity_wait": True,
    }
    return claim(store, slots, job_id, f"tok-{job_id}", **{**options, **kw})


def test_a_success_remembers_its_daemon_in_the_finish_round_trip(store, slots, client) -> None:
    finish(store, slots, "warm", "w", None, {"job_id": "warm", "state": "failed"})  # loads the script
    client.calls.clear()
    record = {"job_id": "f1", "state": "succeeded"}
    finish(store, slots, "f1", "tok", B, record, remember=KEY, remember_ttl_s=40)
    assert client.calls == ["EVALSHA"]
    assert client.get(affinity_key(KEY)) == B.encode()
    assert 0 < client.ttl(affinity_key(KEY)) <= 40
    finish(store, slots, "f2", "tok", A, {"job_id": "f2", "state": "failed"}, remember=None)
    finish(store, slots, "f3", "tok", None, {"job_id": "f3", "state": "failed"}, remember=KEY)
    assert client.get(affinity_key(KEY)) == B.encode()  # neither a failure nor no daemon changes it


def test_the_claim_prefers_the_remembered_daemon_in_its_one_round_trip(store, slots, client) -> None:
    first = take(store, slots, "j0")  # nothing remembered: the least loaded (A, first in the rotation)
    assert (first.daemon, first.preferred, first.preferred_full) == (A, None, False)
    client.set(affinity_key(KEY), B)
    client.calls.clear()
    got = take(store, slots, "j1")
    assert client.calls == ["EVALSHA"]
    assert (got.daemon, got.preferred) == (B, B)
    assert routing_reason(got.preferred, got.daemon) == "affinity"
    # B is more loaded than A now (1 against 1, then 2 against 1), still preferred while it has room
    assert take(store, slots, "j2").daemon == B
    assert client.zcard(slot_key(B)) == 2 and client.zcard(slot_key(A)) == 1


def test_a_full_remembered_daemon_takes_nothing_so_the_caller_can_wait(store, slots, client) -> None:
    client.set(affinity_key(KEY), B)
    client.zadd(slot_key(B), {"x": 9e15, "y": 9e15})  # full (limit 2), far from expiring
    got = take(store, slots, "j1")
    assert (got.daemon, got.preferred, got.preferred_full) == (None, B, True)
    assert client.zscore(slot_key(A), "tok-j1") is None  # no slot held while waiting
    # without the wait (BUILDQ_AFFINITY_WAIT_S=0) it falls back at once
    at_once = take(store, slots, "j2", affinity_wait=False)
    assert (at_once.daemon, at_once.preferred, at_once.preferred_full) == (A, B, False)
    assert routing_reason(at_once.preferred, at_once.daemon) == "fallback"


def test_a_down_or_avoided_remembered_daemon_falls_back_never_to_a_down_one(store, slots, client) -> None:
    client.set(affinity_key(KEY), B)
    health = DaemonHealth(client)
    health.mark_down(B, "refused", 1.0)
    got = take(store, slots, "j1")
    assert (got.daemon, got.preferred, got.preferred_full) == (A, B, False)
    health.mark_down(A, "refused", 1.0)
    assert take(store, slots, "j2").daemon is None  # every daemon down: nothing
    health.mark_up(A, 2.0)
    health.mark_up(B, 2.0)
    # a retry after B dropped its connection avoids B even though B built the cache
    retry = take(store, slots, "j3", avoid=B)
    assert (retry.daemon, routing_reason(retry.preferred, retry.daemon)) == (A, "fallback")


def test_a_remembered_daemon_no_longer_configured_and_affinity_off_are_least_loaded(
    store, slots, client
) -> None:
    client.set(affinity_key(KEY), "tcp://gone:1234")
    got = take(store, slots, "j1")
    assert (got.daemon, got.preferred) == (A, None)
    client.set(affinity_key(KEY), B)
    off = take(store, slots, "j2", cache_key=None)  # BUILDQ_CACHE_AFFINITY=false
    assert off.preferred is None and off.daemon == B  # least loaded: A holds j1
    assert routing_reason(off.preferred, off.daemon) == "least_loaded"


class FakeClock:
    """Monotonic time that moves only when the wait sleeps; ``on_sleep`` runs after each sleep."""

    def __init__(self, on_sleep: Any = None) -> None:
        self.now, self.slept, self.on_sleep = 100.0, 0.0, on_sleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds
        if self.on_sleep is not None:
            self.on_sleep(self)


def wait(slots: DaemonSlots, clock: FakeClock, token: str, **kw: Any) -> str | None:
    options: dict[str, Any] = {"preferred": B, "affinity_wait_s": 2.0, "slot_wait_s": 5.0, "prefer": 0}
    return wait_for_slot_preferring(
        slots, [A, B], token, 30, 1, clock=clock, sleep=clock.sleep, jitter=lambda: 0.5, **{**options, **kw}
    )


def test_the_wait_for_the_remembered_daemon_never_passes_the_setting(slots, client) -> None:
    client.zadd(slot_key(B), {"busy": 9e15})  # B stays full; A is free all along
    clock = FakeClock()
    assert wait(slots, clock, "t1") == A
    assert clock.slept == pytest.approx(2.0)  # polled B for exactly the setting, then fell back
    assert client.zscore(slot_key(A), "t1") is not None
    client.zrem(slot_key(A), "t1")
    none = FakeClock()  # BUILDQ_AFFINITY_WAIT_S=0: no wait at all
    assert wait(slots, none, "t2", affinity_wait_s=0.0) == A and none.slept == 0.0


def test_the_remembered_daemon_is_taken_when_it_frees_within_the_wait(slots, client) -> None:
    client.zadd(slot_key(B), {"busy": 9e15})

    def free_after_a_second(clock: FakeClock) -> None:
        if clock.slept >= 1.0:
            client.zrem(slot_key(B), "busy")

    clock = FakeClock(free_after_a_second)
    assert wait(slots, clock, "t1") == B  # A had room all along: it waited for B instead
    assert 1.0 <= clock.slept < 2.0
    assert client.zscore(slot_key(A), "t1") is None


def test_after_the_affinity_wait_the_ordinary_wait_has_only_what_is_left(slots, client) -> None:
    client.zadd(slot_key(A), {"busy-a": 9e15})
    client.zadd(slot_key(B), {"busy-b": 9e15})  # everything full
    clock = FakeClock()
    assert wait(slots, clock, "t1") is None  # the caller re-queues the job
    assert clock.slept == pytest.approx(5.0)  # 2 s for B, then 3 s for any: the usual 5 s in all


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
    assert 'buildq_routing_total{reason="fallback"}' not in samples
