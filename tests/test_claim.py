"""claim / queue_release against a real Redis (DB 13, flushed around each test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from buildq.store.claim import claim, finish, release
from buildq.store.jobs import JobStore
from buildq.store.keys import (
    QUEUED_INDEX,
    cancel_key,
    done_channel,
    job_key,
    lease_key,
    log_key,
    result_key,
    slot_key,
)
from buildq.store.logs import LogStore
from buildq.store.slots import DaemonSlots
from tests.harness import REDIS_URL, CountingRedis, counting_client

DB_URL = f"{REDIS_URL}/13"
D = ["tcp://bk-0:1234", "tcp://bk-1:1234"]


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


@pytest.fixture
def store(client: CountingRedis) -> JobStore:
    return JobStore(client, result_ttl_s=60)


@pytest.fixture
def slots(store: JobStore) -> DaemonSlots:
    return DaemonSlots(store.scripts)


def take(store: JobStore, slots: DaemonSlots | None, job_id: str, token: str, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "daemons": D,
        "limit": 1,
        "ttl_s": 30,
        "prefer": 0,
        "give_up_after_s": 0,
        "sleep": lambda s: None,
    }
    return claim(store, slots, job_id, token, **{**options, **kw})


def test_first_claim_takes_lease_and_slot_and_keeps_the_janitor_copy(store, slots, client) -> None:
    store.mark_queued("j1", 1.0, "q", message=b"{}", tag="t")
    warm = take(store, slots, "warm", "w")  # the first call loads the script: count from the second
    release(store, slots, "warm", "w", warm.daemon)
    client.calls.clear()
    got = take(store, slots, "j1", "tok")
    assert client.calls == ["EVALSHA"]  # one round trip
    assert (got.record, got.daemon, got.cancelled, got.claimed_before) == (None, D[0], False, False)
    assert client.get(lease_key("j1")) == b"tok"
    assert client.zscore(slot_key(D[0]), "tok") is not None
    # the message stays the janitor's copy until the job finishes (a Redis restart may lose it)
    assert client.hget(job_key("j1"), "msg") == b"{}"
    assert client.zscore(QUEUED_INDEX, "j1") is not None
    assert client.hget(job_key("j1"), "claims") == b"1"
    assert 0 < client.ttl(job_key("j1")) <= 60
    assert finish(store, slots, "j1", "tok", got.daemon, {"job_id": "j1", "state": "succeeded"})
    assert client.hget(job_key("j1"), "msg") is None and client.zscore(QUEUED_INDEX, "j1") is None


def test_the_least_loaded_daemon_is_taken_and_none_when_all_are_full(store, slots) -> None:
    assert take(store, slots, "a", "ta").daemon == D[0]
    assert take(store, slots, "b", "tb").daemon == D[1]
    full = take(store, slots, "c", "tc")
    assert full.daemon is None and full.record is None  # the lease is ours; the caller waits for a slot
    assert store.lease_holder("c") == "tc"


def test_a_finished_job_returns_its_record_and_touches_nothing(store, slots, client) -> None:
    client.set(result_key("done"), json.dumps({"job_id": "done", "state": "succeeded"}))
    got = take(store, slots, "done", "tok")
    assert got.record == {"job_id": "done", "state": "succeeded"}
    assert client.exists(lease_key("done"), slot_key(D[0]), slot_key(D[1]), job_key("done")) == 0


def test_a_cancelled_job_gets_the_lease_but_no_slot(store, slots, client) -> None:
    client.set(cancel_key("c1"), "1")
    got = take(store, slots, "c1", "tok")
    assert got.cancelled and got.daemon is None
    assert store.lease_holder("c1") == "tok"
    assert client.exists(slot_key(D[0]), slot_key(D[1])) == 0


def test_a_second_claim_after_release_knows_an_earlier_delivery_ran(store, slots) -> None:
    first = take(store, slots, "r1", "one")
    release(store, slots, "r1", "one", first.daemon)
    second = take(store, slots, "r1", "two")
    assert second.claimed_before and second.daemon == first.daemon


def test_lease_held_elsewhere_polls_then_times_out(store, slots) -> None:
    take(store, slots, "h1", "owner")
    clock = iter(range(100))
    sleeps: list[float] = []
    with pytest.raises(TimeoutError, match="h1"):
        take(store, slots, "h1", "other", give_up_after_s=3, clock=lambda: next(clock), sleep=sleeps.append)
    assert len(sleeps) == 3
    assert store.lease_holder("h1") == "owner"


def test_without_slots_the_daemon_follows_prefer(store) -> None:
    assert take(store, None, "p1", "t", prefer=3).daemon == D[1]


def test_release_gives_back_only_what_is_ours(store, slots, client) -> None:
    got = take(store, slots, "q1", "mine")
    client.set(lease_key("q2"), "someone-else")
    release(store, slots, "q1", "mine", got.daemon)
    release(store, slots, "q2", "mine", None)
    assert client.exists(lease_key("q1")) == 0
    assert client.zscore(slot_key(got.daemon), "mine") is None
    assert client.get(lease_key("q2")) == b"someone-else"


def test_finish_stores_everything_and_ends_the_claim_in_one_round_trip(store, slots, client) -> None:
    logs = LogStore(client, maxlen=100, ttl_s=50)
    store.mark_queued("f1", 1.0, "q")
    got = take(store, slots, "f1", "tok")
    other = take(store, slots, "f2", "tok2")  # holds the other daemon's slot: must keep it
    finish(store, slots, "warm", "w", None, {"job_id": "warm", "state": "failed"})  # loads the script
    pubsub = client.pubsub()
    pubsub.subscribe(done_channel("f1"))
    client.calls.clear()
    entries = [(1, "plain", "#1 DONE 0.1s"), (1, "mark", "final: succeeded")]
    record = {"job_id": "f1", "state": "succeeded", "image": {"digest": "sha256:ab"}}
    finish(store, slots, "f1", "tok", got.daemon, record, logs=logs, log_entries=entries)
    assert client.calls == ["EVALSHA"]
    assert store.result("f1") == record
    assert store.info("f1")["state"] == "succeeded" and store.info("f1")["phase"] == "done"
    assert 0 < client.ttl(result_key("f1")) <= 60 and 0 < client.ttl(job_key("f1")) <= 60
    assert [(e.attempt, e.kind, e.line) for e in logs.read("f1")] == entries
    assert 0 < client.ttl(log_key("f1")) <= 50
    assert client.exists(lease_key("f1")) == 0
    assert client.zscore(slot_key(got.daemon), "tok") is None
    assert client.zscore(slot_key(other.daemon), "tok2") is not None
    messages = [m for m in iter(lambda: pubsub.get_message(timeout=1), None) if m["type"] == "message"]
    assert [m["data"] for m in messages] == [b"succeeded"]
    pubsub.close()


def test_finish_by_a_holder_whose_lease_is_taken_writes_nothing(store, slots, client) -> None:
    take(store, slots, "f3", "old")
    client.set(lease_key("f3"), "new-owner")
    assert finish(store, slots, "f3", "old", None, {"job_id": "f3", "state": "failed"}) is False
    assert client.get(lease_key("f3")) == b"new-owner"
    assert store.result("f3") is None
    assert client.exists(log_key("f3")) == 0  # no entries, no stream
