"""The janitor re-sends a submitted build whose message the broker lost, and only then (real Redis);
it puts back the deliveries of gone workers, frees dead claims' slots, and runs once per deployment,
at a cost per pass that does not grow with the backlog."""

from __future__ import annotations

import json
import threading
import time

import redis

from buildq.store.janitor import Janitor, requeue_lost, requeue_stalled
from buildq.store.keys import JOBS_INDEX, QUEUES, UNACKED_INDEX_KEY, UNACKED_KEY, job_key
from tests.conftest import scenario
from tests.harness import client_for, free_port, wait_until


def job(context_dir, name: str) -> dict:
    return {"context": str(context_dir), "tags": [f"reg/{name}:1"], "job_id": name}


def age(r: redis.Redis, job_id: str, seconds: float) -> None:
    """As if the job's message had been pushed ``seconds`` earlier."""
    r.hincrby(job_key(job_id), "pushed_at", -int(seconds * 1000))


def test_lost_message_is_sent_again_once(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    handle = client.submit(job(context_dir, "lost-1"))
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    message = r.rpop(queue)  # what BRPOP does; then Redis "restarts" before the unacked HSET
    assert message is not None and r.llen(queue) == 0
    store = client.store
    now = time.time()
    assert requeue_lost(store, after_s=60, now=now) == []  # too young to call lost
    assert requeue_lost(store, after_s=0, now=now + 1) == [handle.job_id]
    back = r.lrange(queue, 0, -1)
    assert len(back) == 1
    sent, again = json.loads(message), json.loads(back[0])  # made again from the job hash
    assert again["headers"]["id"] == sent["headers"]["id"] and again["body"] == sent["body"]
    assert again["properties"]["delivery_tag"] == sent["properties"]["delivery_tag"]
    assert requeue_lost(store, after_s=0, now=now + 2) == []  # already back: never pushed twice


def test_a_message_lost_behind_a_backlog_is_found_without_searching_the_queue(
    buildq_env, context_dir
) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    lost = client.submit(job(context_dir, "early-1"))
    waiting = [client.submit(job(context_dir, f"later-{i}")) for i in range(3)]
    assert json.loads(r.rpop(queue))["headers"]["id"] == lost.job_id  # taken, then lost
    age(r, lost.job_id, 30)  # long before the message now at the queue's head
    before = r.info("commandstats")
    assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == [lost.job_id]
    after = r.info("commandstats")
    assert "cmdstat_lpos" not in after or after["cmdstat_lpos"] == before.get("cmdstat_lpos")
    ids = [json.loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]
    assert sorted(ids) == sorted([lost.job_id, *(h.job_id for h in waiting)])  # each once
    assert ids[-1] == lost.job_id  # back at the head: next out


def test_messages_in_the_queue_unacked_or_claimed_are_left_alone(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    unacked = client.submit(job(context_dir, "unacked-1"))
    claimed = client.submit(job(context_dir, "claimed-1"))
    waiting = client.submit(job(context_dir, "waiting-1"))
    for handle in (unacked, claimed, waiting):
        age(r, handle.job_id, 30)
    # unacked-1: delivered and held by a worker (kombu keeps it under its delivery tag)
    tag = r.hget(job_key(unacked.job_id), "tag")
    assert json.loads(r.rpop(queue))["headers"]["id"] == unacked.job_id
    r.hset(UNACKED_KEY, tag, b"held")
    # claimed-1: a worker took it and builds it (its lease is live)
    assert json.loads(r.rpop(queue))["headers"]["id"] == claimed.job_id
    got = client.store.claim(claimed.job_id, delivery=r.hget(job_key(claimed.job_id), "delivery").decode(),
                             daemons=["tcp://d:1"], limit=1, ttl_s=60, worker="w", domain="d", body="{}",
                             queue=queue)  # fmt: skip
    assert r.zscore(JOBS_INDEX, claimed.job_id) < 0  # claimed: not among the queued the janitor reads
    try:
        assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == []
        assert r.llen(queue) == 1  # only waiting-1, still where it was
        assert r.zscore(JOBS_INDEX, waiting.job_id) > 0
        del got
    finally:
        r.hdel(UNACKED_KEY, tag)


def test_behind_a_message_buildq_did_not_stamp_nothing_is_called_lost(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    lost = client.submit(job(context_dir, "behind-1"))
    r.rpop(queue)
    age(r, lost.job_id, 30)
    r.rpush(queue, json.dumps({"headers": {"id": "raw-9"}, "properties": {"delivery_tag": "x"}}))
    assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == []  # cannot be sure yet
    r.rpop(queue)  # the other producer's message is taken: now the queue says it
    assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == [lost.job_id]


def test_stalled_delivery_of_a_gone_worker_is_put_back(buildq_env, context_dir) -> None:
    """A message held unacknowledged by a worker that is gone (no lease, no record) goes back."""
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    names = ("gone-1", "alive-1", "done-1", "other-task")
    for name in names:
        client.submit(job(context_dir, name))
    delivered = time.time() - 100
    for name in names:  # what kombu does when a worker takes a message
        message = json.loads(r.rpop(queue))
        if name == "other-task":
            message["headers"]["task"] = "somebody.else"
        r.hset(UNACKED_KEY, name, json.dumps([message, "", queue]))
        r.zadd(UNACKED_INDEX_KEY, {name: delivered})
    server_ms = r.time()[0] * 1000
    r.hset(job_key("alive-1"), mapping={"lease": "token", "lease_until": server_ms + 60_000})
    r.hset(job_key("done-1"), "record", json.dumps({"state": "succeeded"}))
    try:
        assert requeue_stalled(client.store, after_s=300) == []  # delivered too recently to judge
        assert requeue_stalled(client.store, after_s=30) == ["gone-1"]
        back = [json.loads(m) for m in r.lrange(queue, 0, -1)]
        assert [m["headers"]["id"] for m in back] == ["gone-1"]
        assert not r.hexists(UNACKED_KEY, "gone-1") and r.hexists(UNACKED_KEY, "alive-1")
        assert requeue_stalled(client.store, after_s=30) == []  # never twice
    finally:
        r.hdel(UNACKED_KEY, *names)
        r.zrem(UNACKED_INDEX_KEY, *names)


def test_one_janitor_per_deployment(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    first = Janitor(client.store, after_s=0.0, owner="w1@a", lease_s=5)
    second = Janitor(client.store, after_s=0.0, owner="w2@b", lease_s=5)
    assert first.holds_lease() and not second.holds_lease()
    lost = client.submit(job(context_dir, "one-1"))
    r.rpop(queue)
    assert second.run_once(now=time.time() + 1) == []  # not its turn: nothing read, nothing pushed
    assert first.run_once(now=time.time() + 1) == [lost.job_id]
    r.delete("buildq:janitor")  # the holder died and its lease ran out: the other takes over
    assert second.holds_lease() and not first.holds_lease()


def test_a_pass_costs_the_same_whatever_the_backlog(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    r.sadd(QUEUES, buildq_env["BUILDQ_QUEUE"])

    def commands_of_a_pass() -> int:
        janitor = Janitor(client.store, after_s=0.0, owner="me", batch=50)
        before = sum(v["calls"] for v in r.info("commandstats").values())
        janitor.run_once(now=time.time() + 1)
        return sum(v["calls"] for v in r.info("commandstats").values()) - before

    for i in range(10):
        client.submit(job(context_dir, f"small-{i}"))
    commands_of_a_pass()  # loads the scripts
    small = commands_of_a_pass()
    for i in range(400):
        client.submit(job(context_dir, f"big-{i}"))
    assert commands_of_a_pass() == small  # the backlog sits behind the queue's head: not even read


def test_messages_put_back_are_never_called_lost_again(buildq_env, context_dir) -> None:
    """Put back at the queue's head, a message is stamped below the head it goes in front of: the
    next pass, with both still in the queue, finds nothing lost."""
    client = client_for(buildq_env)
    queue = buildq_env["BUILDQ_QUEUE"]
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    handles = [client.submit(job(context_dir, f"twice-{i}")) for i in range(3)]
    for handle in handles:
        r.rpop(queue)
        age(r, handle.job_id, 30)
    assert sorted(requeue_lost(client.store, after_s=0, now=time.time() + 1)) == sorted(
        h.job_id for h in handles
    )
    assert requeue_lost(client.store, after_s=0, now=time.time() + 1) == []
    assert r.llen(queue) == 3


def test_a_worker_books_each_delivery_and_its_ack_without_a_transaction(
    buildq_env, start_worker, context_dir, tmp_path
) -> None:
    """The production configuration (two pool processes, metrics on): the delivery of a build is
    recorded in kombu's ``unacked`` hash and index and removed after its ack, each as two plain
    commands in one round trip — no MULTI/EXEC (``book_deliveries_without_transactions``) — and
    both entries are there while the build runs, as the janitor expects."""
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(free_port()), "BUILDQ_METRICS_DIR": str(tmp_path / "m")}
    start_worker(env, concurrency=2)
    client = client_for(env)
    assert client.submit(job(context_dir, "warm-1")).wait(60)["state"] == "succeeded"
    broker = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    db = broker.connection_pool.connection_kwargs.get("db", 0)
    seen: list[dict] = []
    stop = threading.Event()

    def listen() -> None:
        with broker.monitor() as monitor:
            for command in monitor.listen():
                seen.append(command)
                if stop.is_set():
                    return

    watcher = threading.Thread(target=listen, daemon=True)
    watcher.start()
    wait_until(lambda: broker.ping() and seen, timeout=10)  # the MONITOR is on
    handle = client.submit({**job(context_dir, "booked-1"), "build_args": {"STANDIN_SCENARIO": scenario(
        kind="succeed", sleep_s=0.5)}})  # fmt: skip
    tag = wait_until(lambda: broker.hget(job_key(handle.job_id), "tag"), timeout=10).decode()
    wait_until(lambda: broker.hexists(UNACKED_KEY, tag) and broker.zscore(UNACKED_INDEX_KEY, tag), timeout=30)
    assert handle.wait(60)["state"] == "succeeded"
    wait_until(lambda: not broker.hexists(UNACKED_KEY, tag) and broker.zscore(UNACKED_INDEX_KEY, tag) is None)
    stop.set()
    broker.ping()
    watcher.join(timeout=10)
    ours = [c for c in seen if c.get("db") == db and c.get("client_type") != "lua"]
    bookings = (["HSET", UNACKED_KEY, tag], ["HDEL", UNACKED_KEY, tag])
    booking = {(c["client_address"], c["client_port"]) for c in ours if c["command"].split()[:3] in bookings}
    assert booking  # the worker's own connection(s)
    verbs = [c["command"].split()[0] for c in ours if (c["client_address"], c["client_port"]) in booking]
    assert "MULTI" not in verbs and "EXEC" not in verbs, verbs
