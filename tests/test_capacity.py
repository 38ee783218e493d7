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
from buildq.store.jobs import Claimed, Fence, JobStore, rotate
from buildq.store.keys import job_keys, slot_key
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


def fence(token: str) -> Fence:
    """A slot holder's fence: ``take_slot`` needs only its token (the slot set's member)."""
    return Fence(f"job-{token}", token, 1)


def acquire(
    store: JobStore, daemons: list[str], token: str, ttl_s: float, limit: int, prefer: int = 0
) -> Any:
    """A slot on the least loaded of ``daemons`` that has room (None: all full), as a claim polls."""
    return store.take_slot(fence(token), daemons, prefer=prefer, limit=limit, ttl_s=ttl_s)


def take(store: JobStore, daemon: str, token: str, ttl_s: float, limit: int) -> bool:
    """One daemon's slot (``take_slot`` over that daemon alone)."""
    return acquire(store, [daemon], token, ttl_s, limit) == daemon


def claim(store: JobStore, job_id: str, daemons: list[str], *, ttl_s: float = 30, limit: int = 1) -> Claimed:
    """Claim ``job_id`` (a raw producer's message: no delivery id), with its slot."""
    got = store.claim(job_id, delivery="", daemons=daemons, prefer=0, limit=limit, ttl_s=ttl_s, worker="w:1",
                      domain="host", body="{}", queue="q")  # fmt: skip
    assert isinstance(got, Claimed), got
    return got


def give_back(client: Any, daemon: str, token: str) -> bool:
    """Give a slot back as the release, requeue and finish scripts do (``ZREM``)."""
    return bool(client.zrem(slot_key(daemon), token))


def live(client: Any, daemons: list[str]) -> dict[str, int]:
    """Live (unexpired, on Redis' clock) holders per daemon."""
    now = server_ms(client)
    return {d: int(client.zcount(slot_key(d), f"({now}", "+inf")) for d in daemons}


def server_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def wait_until(predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_rotate_dedups_and_starts_at_prefer() -> None:
    assert rotate(["a", "b", "c", "a"], 1) == ["b", "c", "a"]
    assert rotate(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert rotate([], 3) == []


def test_limit_respected_under_threads(store: JobStore, client: CountingRedis) -> None:
    limit, threads, cycles = 3, 8, 50
    lock = threading.Lock()
    holders = 0
    peak = 0
    granted = 0
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        nonlocal holders, peak, granted
        try:
            for i in range(cycles):
                token = f"w{n}-{i}"
                while not take(store, D[0], token, 30, limit):
                    time.sleep(0.0005)
                with lock:  # counted only after the grant, uncounted before the release
                    holders += 1
                    granted += 1
                    peak = max(peak, holders)
                    assert holders <= limit
                with lock:
                    holders -= 1
                assert give_back(client, D[0], token)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors
    assert granted == threads * cycles
    assert 1 <= peak <= limit
    assert live(client, [D[0]]) == {D[0]: 0}


def test_acquire_any_limit_respected_under_threads(store: JobStore, client: CountingRedis) -> None:
    limit, threads, cycles = 2, 8, 50
    lock = threading.Lock()
    holders = dict.fromkeys(D[:2], 0)
    peak = dict.fromkeys(D[:2], 0)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(cycles):
                token = f"w{n}-{i}"
                daemon = None
                while daemon is None:
                    daemon = acquire(store, D[:2], token, 30, limit, prefer=n + i)
                with lock:
                    holders[daemon] += 1
                    peak[daemon] = max(peak[daemon], holders[daemon])
                    assert holders[daemon] <= limit
                with lock:
                    holders[daemon] -= 1
                assert give_back(client, daemon, token)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors
    assert all(1 <= p <= limit for p in peak.values()), peak


def test_claims_respect_the_limit_under_threads(store: JobStore, client: CountingRedis) -> None:
    """The claim takes its slot in the same script: concurrent claims never exceed the limit."""
    limit, threads, cycles = 2, 6, 20
    lock = threading.Lock()
    holders = dict.fromkeys(D[:2], 0)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(cycles):
                job_id = f"c{n}-{i}"
                got = claim(store, job_id, D[:2], limit=limit)
                while got.daemon is None:  # all full: poll as the lifecycle does
                    got = Claimed(got.token, got.gen, got.redis_now, got.history,
                                  daemon=store.take_slot(Fence(job_id, got.token, got.gen), D[:2], prefer=n,
                                                         limit=limit, ttl_s=30))  # fmt: skip
                with lock:
                    holders[got.daemon] += 1
                    assert holders[got.daemon] <= limit
                with lock:
                    holders[got.daemon] -= 1
                assert store.release(Fence(job_id, got.token, got.gen), daemon=got.daemon)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors
    assert live(client, D[:2]) == {D[0]: 0, D[1]: 0}


def test_expired_holder_frees_its_slot(store: JobStore, client: CountingRedis) -> None:
    crashed = claim(store, "crashed", [D[0]], ttl_s=0.3)
    assert crashed.daemon == D[0]
    assert not take(store, D[0], "other", 30, 1)
    wait_until(lambda: take(store, D[0], "other", 30, 1))  # its worker died: lease and slot expire
    again = claim(store, "crashed", D[1:2])  # its job is claimed by another delivery
    # the dead holder's renewal (had it come back) can revive neither its lease nor its slot
    assert store.renew(Fence("crashed", crashed.token, crashed.gen), ttl_s=30, daemon=D[0]) == "fenced"
    assert live(client, [D[0]]) == {D[0]: 1}
    assert client.zscore(slot_key(D[0]), crashed.token) is None
    assert store.lease_holder("crashed") == again.token


def test_renew_keeps_the_slot(store: JobStore, client: CountingRedis) -> None:
    got = claim(store, "a", [D[0]], ttl_s=0.3)
    f = Fence("a", got.token, got.gen)
    first_expiry = client.zscore(slot_key(D[0]), got.token)
    assert first_expiry is not None
    assert store.renew(f, ttl_s=30, daemon=D[0]) == "ok"
    expiry = client.zscore(slot_key(D[0]), got.token)
    assert expiry is not None
    assert 29_000 <= expiry - server_ms(client) <= 30_000
    wait_until(lambda: server_ms(client) > first_expiry + 50)  # past the first lease on Redis' clock
    assert not take(store, D[0], "b", 30, 1)
    assert store.renew(f, ttl_s=30, daemon=D[0]) == "ok"
    assert 0 < client.pttl(slot_key(D[0])) <= 31_000  # the key itself goes away after the last lease


def test_renew_of_a_job_never_claimed_is_fenced(store: JobStore, client: CountingRedis) -> None:
    assert store.renew(Fence("nobody", "tok", 1), ttl_s=30, daemon=D[0]) == "fenced"
    assert client.exists(slot_key(D[0]), job_keys("nobody").lease) == 0


def test_release_frees_and_reports(store: JobStore, client: CountingRedis) -> None:
    got = claim(store, "a", [D[0]])
    assert not take(store, D[0], "b", 30, 1)
    assert store.release(Fence("a", got.token, got.gen), daemon=D[0])
    assert not store.release(Fence("a", got.token, got.gen), daemon=D[0])  # given back already
    assert take(store, D[0], "b", 30, 1)
    assert not give_back(client, D[0], got.token)


def test_acquire_by_holder_extends(store: JobStore, client: CountingRedis) -> None:
    assert take(store, D[0], "a", 30, 1)
    assert take(store, D[0], "a", 30, 1)  # already held: granted, still one holder
    assert live(client, [D[0]]) == {D[0]: 1}


def test_acquire_any_spreads_then_fills(store: JobStore, client: CountingRedis) -> None:
    got = [acquire(store, D, f"t{i}", 30, 2) for i in range(6)]
    assert got == D + D  # least loaded first, ties in rotation order
    assert acquire(store, D, "t6", 30, 2) is None
    assert live(client, D) == {d: 2 for d in D}


def test_claims_spread_then_fill(store: JobStore, client: CountingRedis) -> None:
    got = [claim(store, f"j{i}", D, limit=2).daemon for i in range(6)]
    assert got == D + D
    full = claim(store, "j6", D, limit=2)
    assert full.daemon is None and store.lease_holder("j6") == full.token  # the job is ours, no slot
    assert live(client, D) == {d: 2 for d in D}


def test_acquire_any_prefer_rotates_ties(store: JobStore) -> None:
    assert acquire(store, D, "a", 30, 2, prefer=1) == D[1]
    assert acquire(store, D, "b", 30, 2, prefer=5) == D[2]  # 5 % 3
    assert acquire(store, D, "c", 30, 2, prefer=1) == D[0]  # D[1], D[2] busier: least loaded wins


def test_acquire_any_returns_daemon_already_held(store: JobStore, client: CountingRedis) -> None:
    assert acquire(store, D, "a", 30, 1, prefer=2) == D[2]
    assert acquire(store, D, "a", 30, 1, prefer=0) == D[2]
    assert live(client, D) == {D[0]: 0, D[1]: 0, D[2]: 1}


def test_acquire_any_skips_expired_holders(store: JobStore) -> None:
    assert acquire(store, D[:1], "gone", 0.2, 1) == D[0]
    assert acquire(store, D[:1], "b", 30, 1) is None
    assert wait_until(lambda: acquire(store, D[:1], "b", 30, 1)) == D[0]


def test_acquire_any_is_one_round_trip(store: JobStore, client: CountingRedis) -> None:
    acquire(store, D, "warm", 30, 2)  # loads the script (SCRIPT LOAD → EVALSHA)
    client.calls.clear()
    assert acquire(store, D, "x", 30, 2) is not None
    assert acquire(store, D, "y", 30, 1) is not None
    assert acquire(store, D, "z", 30, 1) is None
    assert client.calls == ["EVALSHA"] * 3


def test_bad_limits_are_refused_by_the_settings(store: JobStore, client: CountingRedis) -> None:
    for name, bad in (("BUILDQ_BUILDKIT_MAX_BUILDS", "0"), ("BUILDQ_LEASE_TTL_S", "0")):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: bad})
    client.calls.clear()
    assert acquire(store, [], "a", 30, 1) is None
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


def fill(r: redis.Redis, daemons: list[str]) -> None:
    """Every slot of ``daemons`` held by another build for a minute."""
    far = (r.time()[0] + 60) * 1000
    for daemon in daemons:
        r.zadd(slot_key(daemon), {"other-" + daemon: far})


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
    assert live(r, ["tcp://d0:1", "tcp://d1:1"]) == {"tcp://d0:1": 1, "tcp://d1:1": 1}
    assert standin_log.starts() == []


def test_a_slot_freed_during_the_wait_runs_the_build_there(
    runtime: PoolRuntime, context_dir: Path, standin_log: StandinLog
) -> None:
    r = runtime.store.redis
    runtime.lifecycle.slot_wait_s = 5.0
    delivery = submit(runtime, "freed1", context_dir)
    fill(r, ["tcp://d0:1", "tcp://d1:1"])
    threading.Timer(0.4, lambda: r.zrem(slot_key("tcp://d1:1"), "other-tcp://d1:1")).start()
    started = time.monotonic()
    ending = runtime.lifecycle.handle(delivery)
    assert time.monotonic() - started < 4.0
    assert ending.kind == "finished" and ending.record is not None
    assert ending.record["state"] == "succeeded" and ending.record["daemon"] == "tcp://d1:1"
    assert len(standin_log.starts()) == 1
    assert r.zscore(slot_key("tcp://d1:1"), "other-tcp://d1:1") is None  # its slot given back after


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
