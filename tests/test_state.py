"""JobStore.wait_result against a real Redis (DB 13, flushed around each test)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from buildq.store.jobs import JobStore
from tests.harness import REDIS_URL


@pytest.fixture
def store() -> Iterator[JobStore]:
    s = JobStore.from_url(f"{REDIS_URL}/13", result_ttl_s=60)
    s.redis.flushdb()
    yield s
    s.redis.flushdb()
    s.redis.close()


def connections_made(r: redis.Redis) -> int:
    return int(r.info("stats")["total_connections_received"])


def test_wait_returns_a_result_stored_later(store: JobStore) -> None:
    timer = threading.Timer(0.05, store.store_rejected, args=("w1", {"job_id": "w1", "state": "succeeded"}))
    timer.start()
    assert store.wait_result("w1", timeout=10) == {"job_id": "w1", "state": "succeeded"}
    timer.join()


def test_wait_times_out_with_none(store: JobStore) -> None:
    assert store.wait_result("never", timeout=0.05) is None


def test_waits_share_one_subscriber_connection(store: JobStore) -> None:
    def wait_for_one(i: int) -> None:
        store.store_rejected(f"other-{i}", {"job_id": f"other-{i}", "state": "failed"})  # another channel
        record = {"job_id": f"j{i}", "state": "succeeded"}
        timer = threading.Timer(0.01, store.store_rejected, args=(f"j{i}", record))
        timer.start()
        assert store.wait_result(f"j{i}", timeout=10) == record
        timer.join()

    for i in range(3):  # the pool grows to what two threads need at once
        wait_for_one(i)
    before = connections_made(store.redis)
    for i in range(3, 30):
        wait_for_one(i)
    # 27 waits: the old code opened one connection each; the pool may still grow by a spare
    assert connections_made(store.redis) - before <= 2


def test_an_interrupted_wait_drops_its_subscriber(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.wait_result("warm", timeout=0.01)
    broken = store._subscriber()
    monkeypatch.setattr(broken, "get_message", lambda **_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.wait_result("x", timeout=5)
    assert store._subscriber() is not broken
    assert store.wait_result("x", timeout=0.01) is None
