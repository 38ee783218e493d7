"""The janitor re-sends a submitted build whose message the broker lost, and only then (real Redis)."""

from __future__ import annotations

import time

import redis

from buildq.store.janitor import requeue_lost
from buildq.store.keys import QUEUED_INDEX, UNACKED_KEY
from tests.harness import client_for


def test_lost_message_is_sent_again_once(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    handle = client.submit({"context": str(context_dir), "tags": ["reg/lost:1"], "job_id": "lost-1"})
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    message = r.rpop(queue)  # what BRPOP does; then Redis "restarts" before the unacked HSET
    assert message is not None and r.llen(queue) == 0
    store = client.store
    now = time.time()
    assert requeue_lost(store, after_s=60, now=now) == []  # too young to call lost
    assert requeue_lost(store, after_s=0, now=now + 1) == [handle.job_id]
    assert r.lrange(queue, 0, -1) == [message]
    assert requeue_lost(store, after_s=0, now=now + 2) == []  # already back: never pushed twice


def test_messages_in_the_queue_unacked_or_claimed_are_left_alone(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    waiting = client.submit({"context": str(context_dir), "tags": ["reg/a:1"], "job_id": "waiting-1"})
    unacked = client.submit({"context": str(context_dir), "tags": ["reg/b:1"], "job_id": "unacked-1"})
    claimed = client.submit({"context": str(context_dir), "tags": ["reg/c:1"], "job_id": "claimed-1"})
    # unacked-1: delivered and held by a worker (kombu keeps it under its delivery tag)
    tag = r.hget(f"buildq:job:{unacked.job_id}", "tag")
    r.lrem(queue, 0, r.hget(f"buildq:job:{unacked.job_id}", "msg"))
    r.hset(UNACKED_KEY, tag, b"held")
    # claimed-1: a worker took it and builds it (its lease is live; the copy stays until the finish)
    r.lrem(queue, 0, r.hget(f"buildq:job:{claimed.job_id}", "msg"))
    r.hincrby(f"buildq:job:{claimed.job_id}", "claims", 1)
    r.set(f"buildq:lease:{claimed.job_id}", "token", px=60_000)
    try:
        assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == []
        assert r.llen(queue) == 1  # only waiting-1, still where it was
        assert r.zscore(QUEUED_INDEX, waiting.job_id) is not None
        assert r.zscore(QUEUED_INDEX, claimed.job_id) is not None  # tracked until it finishes
        r.delete(f"buildq:lease:{claimed.job_id}")  # its worker died and the delivery is gone too
        assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == [claimed.job_id]
    finally:
        r.hdel(UNACKED_KEY, tag)


def test_stalled_delivery_of_a_gone_worker_is_put_back(buildq_env, context_dir) -> None:
    """A message held unacknowledged by a worker that is gone (no lease, no result) goes back."""
    import json

    from buildq.store.janitor import requeue_stalled
    from buildq.store.keys import UNACKED_INDEX_KEY

    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    handles = {
        name: client.submit({"context": str(context_dir), "tags": [f"reg/{name}:1"], "job_id": name})
        for name in ("gone-1", "alive-1", "done-1", "other-task")
    }
    delivered = time.time() - 100
    for name in handles:  # what kombu does when a worker takes a message
        raw = r.rpop(queue)
        message = json.loads(raw)
        if name == "other-task":
            message["headers"]["task"] = "somebody.else"
        r.hset(UNACKED_KEY, name, json.dumps([message, "", queue]))
        r.zadd(UNACKED_INDEX_KEY, {name: delivered})
    r.set("buildq:lease:alive-1", "token", px=60_000)
    r.set("buildq:result:done-1", json.dumps({"state": "succeeded"}))
    try:
        assert requeue_stalled(client.store, after_s=300) == []  # delivered too recently to judge
        assert requeue_stalled(client.store, after_s=30) == ["gone-1"]
        back = [json.loads(m) for m in r.lrange(queue, 0, -1)]
        assert [m["headers"]["id"] for m in back] == ["gone-1"]
        assert not r.hexists(UNACKED_KEY, "gone-1") and r.hexists(UNACKED_KEY, "alive-1")
        assert requeue_stalled(client.store, after_s=30) == []  # never twice
    finally:
        r.hdel(UNACKED_KEY, *handles)
        r.zrem(UNACKED_INDEX_KEY, *handles)
