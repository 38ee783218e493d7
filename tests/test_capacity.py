"""Daemon slots against a real Redis (DB 13, flushed around each test): the claim, the polled
``take_slot``, the holder's renewal and release (the store's named protocol), and the lifecycle's
wait for a slot when every daemon is full."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.client import BuildqClient
from buildq.config import SettingsError, load_settings
from buildq.contract.wire import Delivery
from buildq.engine.runtime import PoolRuntime
from buildq.store.janitor import release_expired_slots
from buildq.store.jobs import Claimed, Fence, JobStore
from buildq.store.keys import job_key, load_key
from tests.harness import REDIS_URL, CountingRedis, StandinLog, counting_client
from tests.inprocess import deliver, pool_env, pool_runtime

DB_URL = f"{REDIS_URL}/13"
D = ["tcp://bk-0:1234", "tcp://bk-1:1234", "tcp://bk-2:1234"]


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


@pytest.fixture
def store(client: CountingRedis) -> JobStore:
    return JobStore(client, result_ttl_s=60)


def claim(store: JobStore, job_id: str, daemons: list[str], *, ttl_s: float = 30, limit: int = 1) -> Claimed:
    """Claim ``job_id`` (a raw producer's message: no delivery id), with its slot."""
    got = store.claim(job_id, delivery="", daemons=daemons, limit=limit, ttl_s=ttl_s, worker="w:1",
                      domain="host", body="{}", queue="q")  # fmt: skip
    assert isinstance(got, Claimed), got
    return got


def fence(job_id: str, got: Claimed) -> Fence:
    return Fence(job_id, got.token, got.gen)


def live(client: Any, daemons: list[str]) -> dict[str, int]:
    """Builds per daemon, as the load index of ``daemons`` counts them."""
    index = load_key(daemons)
    return {d: int(client.zscore(index, d) or 0) for d in daemons}


def wait_until(predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def run_threads(target: Any, threads: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=guarded, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    return errors


def test_claims_respect_the_limit_under_threads(store: JobStore, client: CountingRedis) -> None:
    """The claim takes its slot in the same script, a polled take_slot likewise: concurrent claims
    never exceed the limit, and every slot is given back once."""
    limit, cycles = 2, 20
    lock = threading.Lock()
    holders = dict.fromkeys(D[:2], 0)
    peak = dict.fromkeys(D[:2], 0)

    def worker(n: int) -> None:
        for i in range(cycles):
            job_id = f"c{n}-{i}"
            got = claim(store, job_id, D[:2], limit=limit)
            daemon = got.daemon
            while daemon is None:  # all full: poll as the lifecycle does
                daemon = store.take_slot(fence(job_id, got), D[:2], limit=limit, attempt=1, worker="w")
            with lock:
                holders[daemon] += 1
                peak[daemon] = max(peak[daemon], holders[daemon])
                assert holders[daemon] <= limit
            with lock:
                holders[daemon] -= 1
            if i % 2:
                assert store.release(fence(job_id, got))
            else:
                assert store.finish(fence(job_id, got), record="{}", state="succeeded")

    assert not run_threads(worker, 6)
    assert all(1 <= p <= limit for p in peak.values()), peak
    assert live(client, D[:2]) == {D[0]: 0, D[1]: 0}


def test_a_dead_holders_slot_counts_until_a_takeover_or_the_janitor_gives_it_back(
    store: JobStore, client: CountingRedis
) -> None:
    crashed = claim(store, "crashed", [D[0]], ttl_s=0.3)
    assert crashed.daemon == D[0]
    wait_until(lambda: store.lease_holder("crashed") is None)  # its worker died: the lease ran out
    assert claim(store, "other", [D[0]]).daemon is None  # its slot still counts
    assert release_expired_slots(store, grace_s=0.0) == ["crashed"]
    assert release_expired_slots(store, grace_s=0.0) == []  # given back once
    assert live(client, [D[0]]) == {D[0]: 0}
    again = claim(store, "crashed", [D[0]])  # its job is claimed by another delivery
    assert again.daemon == D[0] and live(client, [D[0]]) == {D[0]: 1}
    # the dead holder's renewal (had it come back) revives nothing
    assert store.renew(fence("crashed", crashed), ttl_s=30) == "fenced"
    assert store.lease_holder("crashed") == again.token


def test_a_takeover_gives_the_dead_holders_slot_back(store: JobStore, client: CountingRedis) -> None:
    crashed = claim(store, "tk", [D[0]], ttl_s=0.2)
    wait_until(lambda: store.lease_holder("tk") is None)
    again = claim(store, "tk", [D[0]])
    assert (again.gen, again.daemon) == (crashed.gen + 1, D[0])
    assert live(client, [D[0]]) == {D[0]: 1}  # the dead claim's slot became the takeover's


def test_a_live_claims_slot_is_never_taken_by_the_janitor(store: JobStore, client: CountingRedis) -> None:
    claim(store, "alive", [D[0]], ttl_s=30)
    assert release_expired_slots(store, grace_s=0.0) == []
    assert live(client, [D[0]]) == {D[0]: 1}


def test_renew_of_a_job_never_claimed_is_fenced(store: JobStore, client: CountingRedis) -> None:
    assert store.renew(Fence("nobody", "tok", 1), ttl_s=30) == "fenced"
    assert client.exists(job_key("nobody")) == 0


def test_release_frees_and_reports(store: JobStore, client: CountingRedis) -> None:
    got = claim(store, "a", [D[0]])
    assert claim(store, "b", [D[0]]).daemon is None
    assert store.release(fence("a", got))
    assert not store.release(fence("a", got))  # given back already
    assert live(client, [D[0]]) == {D[0]: 0}
    assert store.take_slot(Fence("b", "x", 1), [D[0]], limit=1, attempt=1, worker="w") == D[0]


def test_claims_spread_then_fill(store: JobStore, client: CountingRedis) -> None:
    got = [claim(store, f"j{i}", D, limit=2).daemon for i in range(6)]
    assert got == D + D  # least loaded first
    full = claim(store, "j6", D, limit=2)
    assert full.daemon is None and store.lease_holder("j6") == full.token  # the job is ours, no slot
    assert live(client, D) == {d: 2 for d in D}


def test_take_slot_is_one_round_trip(store: JobStore, client: CountingRedis) -> None:
    got = claim(store, "one", D, limit=0)  # loads the scripts, registers the daemons
    store.take_slot(fence("one", got), D, limit=0, attempt=1, worker="w")
    client.calls.clear()
    assert store.take_slot(fence("one", got), D, limit=1, attempt=1, worker="w") == D[0]
    assert client.calls == ["EVALSHA"]


def test_bad_limits_are_refused_by_the_settings(store: JobStore, client: CountingRedis) -> None:
    for name, bad in (("BUILDQ_BUILDKIT_MAX_BUILDS", "0"), ("BUILDQ_LEASE_TTL_S", "0")):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: bad})
    client.calls.clear()
    assert store.take_slot(Fence("a", "t", 1), [], limit=1, attempt=1, worker="w") is None
    assert client.calls == []  # no daemon: no round trip


# -- the lifecycle's wait for a slot (a real PoolRuntime: the stand-in, no Celery) --------------

DAEMONS = "tcp://d0:1,tcp://d1:1"


@pytest.fixture
def runtime(tmp_path: Path, standin: Path, standin_log: StandinLog, monkeypatch) -> Iterator[PoolRuntime]:
    monkeypatch.setenv("STANDIN_LOG", str(standin_log.path))
    env = pool_env(16, "cap", standin, tmp_path / "state", BUILDQ_BUILDKIT_HOSTS=DAEMONS,
                   BUILDQ_BUILDKIT_MAX_BUILDS="1", BUILDQ_AFFINITY_WAIT_S="0")  # fmt: skip
    with pool_runtime(env) as rt:
        yield rt


WORKER_DAEMONS = DAEMONS.split(",")


def fill(r: redis.Redis, daemons: list[str]) -> None:
    """Every slot of ``daemons`` held by another build."""
    r.zadd(load_key(WORKER_DAEMONS), dict.fromkeys(daemons, 1))


def submit(rt: PoolRuntime, job_id: str, context: Path) -> Delivery:
    BuildqClient(rt.settings).submit({"job_id": job_id, "context": str(context), "tags": ["reg/cap:1"]})
    return deliver(rt.store.redis, "cap")


def test_every_daemon_full_the_job_waits_for_a_slot_then_goes_back_to_the_queue(
    runtime: PoolRuntime, context_dir: Path, standin_log: StandinLog
) -> None:
    r = runtime.store.redis
    runtime.lifecycle.slot_wait_s = 0.6
    delivery = submit(runtime, "full1", context_dir)
    fill(r, ["tcp://d0:1", "tcp://d1:1"])
    started = time.monotonic()
    ending = runtime.lifecycle.handle(delivery)
    waited = time.monotonic() - started
    assert (ending.kind, ending.reason) == ("requeued", "waiting_for_daemon")
    assert 0.6 <= waited < 2.5
    assert 1.0 <= ending.countdown <= 3.0  # up but full: back soon, spread out
    info = runtime.store.info("full1")
    assert (info["state"], info["phase"]) == ("queued", "waiting_for_daemon")
    assert json.loads(info["attempts"]) == [] and "waiting_since" not in info  # no attempt used
    assert runtime.store.lease_holder("full1") is None and r.llen("cap") == 1
    assert live(r, WORKER_DAEMONS) == {"tcp://d0:1": 1, "tcp://d1:1": 1}
    assert standin_log.starts() == []


def test_a_slot_freed_during_the_wait_runs_the_build_there(
    runtime: PoolRuntime, context_dir: Path, standin_log: StandinLog
) -> None:
    r = runtime.store.redis
    runtime.lifecycle.slot_wait_s = 5.0
    delivery = submit(runtime, "freed1", context_dir)
    fill(r, ["tcp://d0:1", "tcp://d1:1"])
    threading.Timer(0.4, lambda: r.zincrby(load_key(WORKER_DAEMONS), -1, "tcp://d1:1")).start()
    started = time.monotonic()
    ending = runtime.lifecycle.handle(delivery)
    assert time.monotonic() - started < 4.0
    assert ending.kind == "finished" and ending.record is not None
    assert ending.record["state"] == "succeeded" and ending.record["daemon"] == "tcp://d1:1"
    assert len(standin_log.starts()) == 1
    assert live(r, WORKER_DAEMONS) == {"tcp://d0:1": 1, "tcp://d1:1": 0}  # its slot given back after


def test_without_a_slot_wait_it_tries_once_and_goes_back_at_once(
    runtime: PoolRuntime, context_dir: Path
) -> None:
    r = runtime.store.redis
    runtime.lifecycle.slot_wait_s = 0.0
    delivery = submit(runtime, "nowait1", context_dir)
    fill(r, ["tcp://d0:1", "tcp://d1:1"])
    started = time.monotonic()
    ending = runtime.lifecycle.handle(delivery)
    assert time.monotonic() - started < 0.5
    assert (ending.kind, ending.reason) == ("requeued", "waiting_for_daemon")
