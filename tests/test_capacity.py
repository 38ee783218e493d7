"""DaemonSlots against a real Redis (DB 13, flushed around each test)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from buildq.store.jobs import JobStore
from buildq.store.keys import slot_key
from buildq.store.slots import DaemonSlots, rotate, wait_for_slot
from tests.harness import REDIS_URL, CountingRedis, counting_client

DB_URL = f"{REDIS_URL}/13"
D = ["tcp://bk-0:1234", "tcp://bk-1:1234", "tcp://bk-2:1234"]


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


@pytest.fixture
def slots(client: CountingRedis) -> DaemonSlots:
    return slots_of(client)


def slots_of(client: Any) -> DaemonSlots:
    return DaemonSlots(JobStore(client, result_ttl_s=60).scripts)


def take(slots: DaemonSlots, daemon: str, token: str, ttl_s: float, limit: int) -> bool:
    """One daemon's slot, as the claim takes it (``acquire_any`` over that daemon alone)."""
    return slots.acquire_any([daemon], token, ttl_s, limit) == daemon


def give_back(client: Any, daemon: str, token: str) -> bool:
    """Give a slot back as the release and finish scripts do (``ZREM``)."""
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


def test_limit_respected_under_threads(client: CountingRedis) -> None:
    limit, threads, cycles = 3, 8, 50
    slots = slots_of(client)
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
                while not take(slots, D[0], token, 30, limit):
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


def test_acquire_any_limit_respected_under_threads(client: CountingRedis) -> None:
    limit, threads, cycles = 2, 8, 50
    slots = slots_of(client)
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
                    daemon = slots.acquire_any(D[:2], token, 30, limit, prefer=n + i)
                with lock:
                    holders[daemon] += 1
                    peak[daemon] = max(peak[daemon], holders[daemon])
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


def test_expired_holder_frees_its_slot(slots: DaemonSlots, client: CountingRedis) -> None:
    assert take(slots, D[0], "crashed", 0.3, 1)
    assert not take(slots, D[0], "other", 30, 1)
    wait_until(lambda: take(slots, D[0], "other", 30, 1))
    assert not slots.renew(D[0], "crashed", 30)  # its slot is gone, renewing cannot revive it
    assert live(client, [D[0]]) == {D[0]: 1}


def test_renew_keeps_the_slot(slots: DaemonSlots, client: CountingRedis) -> None:
    assert take(slots, D[0], "a", 0.3, 1)
    first_expiry = client.zscore(slot_key(D[0]), "a")
    assert first_expiry is not None
    assert slots.renew(D[0], "a", 30)
    expiry = client.zscore(slot_key(D[0]), "a")
    assert expiry is not None
    assert 29_000 <= expiry - server_ms(client) <= 30_000
    wait_until(lambda: server_ms(client) > first_expiry + 50)  # past the first lease on Redis' clock
    assert not take(slots, D[0], "b", 30, 1)
    assert slots.renew(D[0], "a", 30)
    assert 0 < client.pttl(slot_key(D[0])) <= 31_000  # the key itself goes away after the last lease


def test_renew_of_unknown_token_is_false(slots: DaemonSlots) -> None:
    assert not slots.renew(D[0], "nobody", 30)


def test_release_frees_and_reports(slots: DaemonSlots, client: CountingRedis) -> None:
    assert take(slots, D[0], "a", 30, 1)
    assert not take(slots, D[0], "b", 30, 1)
    assert give_back(client, D[0], "a")
    assert not give_back(client, D[0], "a")
    assert take(slots, D[0], "b", 30, 1)


def test_acquire_by_holder_extends(slots: DaemonSlots, client: CountingRedis) -> None:
    assert take(slots, D[0], "a", 30, 1)
    assert take(slots, D[0], "a", 30, 1)  # already held: granted, still one holder
    assert live(client, [D[0]]) == {D[0]: 1}


def test_acquire_any_spreads_then_fills(slots: DaemonSlots, client: CountingRedis) -> None:
    got = [slots.acquire_any(D, f"t{i}", 30, 2) for i in range(6)]
    assert got == D + D  # least loaded first, ties in rotation order
    assert slots.acquire_any(D, "t6", 30, 2) is None
    assert live(client, D) == {d: 2 for d in D}


def test_acquire_any_prefer_rotates_ties(slots: DaemonSlots) -> None:
    assert slots.acquire_any(D, "a", 30, 2, prefer=1) == D[1]
    assert slots.acquire_any(D, "b", 30, 2, prefer=5) == D[2]  # 5 % 3
    assert slots.acquire_any(D, "c", 30, 2, prefer=1) == D[0]  # D[1], D[2] busier: least loaded wins


def test_acquire_any_returns_daemon_already_held(slots: DaemonSlots, client: CountingRedis) -> None:
    assert slots.acquire_any(D, "a", 30, 1, prefer=2) == D[2]
    assert slots.acquire_any(D, "a", 30, 1, prefer=0) == D[2]
    assert live(client, D) == {D[0]: 0, D[1]: 0, D[2]: 1}


def test_acquire_any_skips_expired_holders(slots: DaemonSlots) -> None:
    assert slots.acquire_any(D[:1], "gone", 0.2, 1) == D[0]
    assert slots.acquire_any(D[:1], "b", 30, 1) is None
    assert wait_until(lambda: slots.acquire_any(D[:1], "b", 30, 1)) == D[0]


def test_acquire_any_is_one_round_trip(slots: DaemonSlots, client: CountingRedis) -> None:
    slots.acquire_any(D, "warm", 30, 2)  # loads the script (EVALSHA miss → SCRIPT LOAD → EVALSHA)
    client.calls.clear()
    assert slots.acquire_any(D, "x", 30, 2) is not None
    assert slots.acquire_any(D, "y", 30, 1) is not None
    assert slots.acquire_any(D, "z", 30, 1) is None
    assert client.calls == ["EVALSHA"] * 3


def test_bad_arguments_rejected(slots: DaemonSlots) -> None:
    with pytest.raises(ValueError):
        take(slots, D[0], "a", 0, 1)
    with pytest.raises(ValueError):
        take(slots, D[0], "a", 30, 0)
    assert slots.acquire_any([], "a", 30, 1) is None


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.on_sleep: Any = None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def test_wait_for_slot_gives_up_after_max_wait(slots: DaemonSlots, client: CountingRedis) -> None:
    for d in D[:2]:
        assert take(slots, d, "busy-" + d, 30, 1)
    fake = FakeTime()
    jitters = iter([0.0, 0.99, 0.5] * 20)
    got = wait_for_slot(
        slots,
        D[:2],
        "me",
        30,
        1,
        max_wait_s=2.0,
        poll_s=0.4,
        clock=fake.clock,
        sleep=fake.sleep,
        jitter=lambda: next(jitters),
    )
    assert got is None
    assert fake.now == pytest.approx(102.0)  # the last sleep is cut at the deadline
    assert all(0 < s <= 0.4 * 1.5 for s in fake.sleeps)
    assert fake.sleeps[:3] == pytest.approx([0.2, 0.596, 0.4])
    assert live(client, D[:2]) == {D[0]: 1, D[1]: 1}


def test_wait_for_slot_returns_freed_daemon(slots: DaemonSlots, client: CountingRedis) -> None:
    for d in D[:2]:
        assert take(slots, d, "busy-" + d, 30, 1)
    fake = FakeTime()
    fake.on_sleep = lambda: len(fake.sleeps) == 3 and give_back(client, D[1], "busy-" + D[1])
    got = wait_for_slot(
        slots,
        D[:2],
        "me",
        30,
        1,
        max_wait_s=5.0,
        poll_s=0.2,
        clock=fake.clock,
        sleep=fake.sleep,
        jitter=lambda: 0.5,
    )
    assert got == D[1]
    assert fake.sleeps == [0.2, 0.2, 0.2]


def test_wait_for_slot_tries_once_without_waiting(slots: DaemonSlots) -> None:
    fake = FakeTime()
    assert wait_for_slot(slots, D, "me", 30, 1, max_wait_s=0, clock=fake.clock, sleep=fake.sleep) == D[0]
    assert fake.sleeps == []
