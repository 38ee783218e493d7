"""The deployment's queue gauges: computed by one worker at a time (a lease), right on a live
worker during a run, bounded label values, counters at 0 from the start."""

from __future__ import annotations

import time

import pytest
import redis

from buildq.engine.hooks import BuildMetrics, DeploymentGauges, bounded
from buildq.store.gauges import parse_snapshot, read_gauges
from buildq.store.jobs import JobStore
from buildq.store.keys import DOWN_LOAD, GAUGES_LEASE, JOBS_INDEX, WAITING_INDEX, job_key, load_key
from tests.conftest import scenario
from tests.harness import REDIS_URL, client_for, free_port, wait_until
from tests.test_observability import scrape

DAEMON = "tcp://127.0.0.1:1234"


@pytest.fixture
def store():
    client = redis.Redis.from_url(f"{REDIS_URL}/20")
    client.flushdb()
    yield JobStore(client, result_ttl_s=600)
    client.flushdb()
    client.close()


def _read(store: JobStore, worker: str, **kw):
    args = {"queue": "q", "high_queue": "q.high", "daemons": [DAEMON, "tcp://b:1"], "limit": 2, "lease_s": 15}
    return read_gauges(store, worker=worker, **{**args, **kw})


def test_one_worker_computes_the_others_read_its_snapshot(store) -> None:
    r = store.redis
    now = float(r.time()[0])
    r.lpush("q", "m1", "m2", "m3")
    # two running jobs are older than the oldest queued one (scored -enqueued_at: not in the queued
    # band); a retry in its backoff is older still and not due
    r.zadd(JOBS_INDEX, {"run1": -(now - 90), "run2": -(now - 80), "later": now - 60, "old": now - 40,
                        "new": now - 5})  # fmt: skip
    for job, state in (("run1", "running"), ("run2", "running"), ("old", "queued"), ("new", "queued")):
        r.hset(job_key(job), "state", state)
    r.hset(job_key("later"), mapping={"state": "queued", "phase": "retry_wait"})
    # two builds hold slots on DAEMON; the other daemon's breaker is open (its load + DOWN_LOAD)
    r.zadd(load_key([DAEMON, "tcp://b:1"]), {DAEMON: 2, "tcp://b:1": DOWN_LOAD})
    first = _read(store, "w1")
    assert first.computed and first.snapshot is not None
    snap = first.snapshot
    assert snap.queues == {"q": 3, "q.high": 0}
    assert 39 <= snap.oldest_queued_s <= 45
    assert snap.slots == {DAEMON: 2, "tcp://b:1": 0} and snap.running == 2 and snap.full == 1
    # another worker gets the same snapshot without computing (the lease is w1's)
    r.lpush("q", "m4")
    second = _read(store, "w2")
    assert not second.computed and second.snapshot == snap
    assert r.get(GAUGES_LEASE) == b"w1"
    # the holder computes again; once its lease is gone another worker takes over
    assert _read(store, "w1").snapshot.queues["q"] == 4
    r.delete(GAUGES_LEASE)
    third = _read(store, "w2")
    assert third.computed and third.snapshot.by == "w2"


def test_waiting_for_a_daemon_counts_jobs_still_waiting_and_drops_the_rest(store) -> None:
    r = store.redis
    ms = float(r.time()[0]) * 1000
    r.zadd(WAITING_INDEX, {"waits": ms, "runs": ms, "done": ms, "expired": ms})
    r.hset(job_key("waits"), mapping={"state": "queued", "phase": "waiting_for_daemon"})
    r.hset(job_key("runs"), mapping={"state": "running", "phase": "build"})
    r.hset(job_key("done"), mapping={"state": "succeeded", "phase": "done"})
    assert _read(store, "w1").snapshot.waiting_for_daemon == 1
    assert r.zrange(WAITING_INDEX, 0, -1) == [b"waits"]


def test_snapshot_parse_and_a_stale_one_is_not_served() -> None:
    text = '{"at":100.5,"by":"w","queues":{"q":2},"oldest_queued_s":3,"slots":[],"limit":4,"workers":2,' \
           '"waiting_for_daemon":0}'  # fmt: skip
    snap = parse_snapshot(text)
    assert snap.slots == {} and snap.queues == {"q": 2} and snap.full == 0

    class Read:
        snapshot, computed, now = snap, True, 101.0

    clock = [0.0]
    gauges = DeploymentGauges(clock=lambda: clock[0])
    assert list(gauges.collect()) == []  # nothing read yet: nothing served
    gauges.update(Read())  # type: ignore[arg-type]
    names = {m.name for m in gauges.collect()}
    assert {"buildq_queue_depth", "buildq_workers_live", "buildq_gauges_age_seconds"} <= names
    clock[0] = 61.0
    assert [m.name for m in gauges.collect()] == ["buildq_gauges_age_seconds"]
    assert gauges.age() == pytest.approx(61.5)


def test_label_values_come_from_fixed_sets_and_counters_start_at_zero() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    assert bounded("goaway", ("goaway",)) == "goaway"
    assert bounded("x" * 300, ("goaway",)) == "other" and bounded(None, ("a",)) == "other"
    registry = CollectorRegistry()
    metrics = BuildMetrics(registry)
    text = generate_latest(registry).decode()
    for line in (
        'buildq_builds_total{outcome="failed"} 0.0',
        'buildq_build_attempts_total{outcome="failed",reason="goaway"} 0.0',
        'buildq_build_attempts_total{outcome="succeeded",reason="none"} 0.0',
        'buildq_cache_exports_total{outcome="failed"} 0.0',
        'buildq_routing_total{reason="fallback"} 0.0',
    ):
        assert line in text, line
    metrics.build_finished({"state": "weird", "phases": {"build": 1.0, "made-up": 2.0}})
    metrics.attempt_finished({"outcome": "failed", "reason": "<script>", "routing": "nope"})
    text = generate_latest(registry).decode()
    assert 'buildq_builds_total{outcome="other"} 1.0' in text
    assert 'buildq_build_phase_seconds_count{outcome="other",phase="other"} 1.0' in text
    assert 'buildq_build_phase_seconds_count{outcome="other",phase="build"} 1.0' in text
    assert 'buildq_build_attempts_total{outcome="failed",reason="other"} 1.0' in text
    assert 'buildq_routing_total{reason="other"} 1.0' in text


def _hang(context_dir, tag: str) -> dict:
    return {
        "context": str(context_dir),
        "tags": [tag],
        "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")},
    }


def _gauges(port: int) -> dict[str, float]:
    return {
        k: v for k, v in scrape(port).items() if not k.startswith(("buildq_build_", "python_", "process_"))
    }


def test_a_live_worker_serves_the_gauges_during_a_run(
    buildq_env, start_worker, context_dir, tmp_path
) -> None:
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom"),
           "BUILDQ_BUILDKIT_MAX_BUILDS": "2"}  # fmt: skip
    queue, high = env["BUILDQ_QUEUE"], env["BUILDQ_HIGH_PRIORITY_QUEUE"]
    start_worker(env, concurrency=2)
    # before any build: every known counter at 0, and the gauges of an idle deployment
    idle = wait_until(lambda: (s := scrape(port)).get("buildq_workers_live") == 1.0 and s, timeout=20)
    assert idle['buildq_builds_total{outcome="failed"}'] == 0.0
    assert idle["buildq_janitor_requeues_total"] == 0.0
    assert idle[f'buildq_queue_depth{{queue="{queue}"}}'] == 0.0
    client = client_for(env)
    running = [client.submit(_hang(context_dir, f"reg/run{i}:1")) for i in range(2)]
    wait_until(lambda: all(h.status()["state"] == "running" for h in running), timeout=30)
    queued = [client.submit(_hang(context_dir, f"reg/wait{i}:1")) for i in range(3)]
    submitted = time.monotonic()

    def settled() -> dict[str, float] | None:
        g = _gauges(port)
        return g if g.get(f'buildq_queue_depth{{queue="{queue}"}}') == 3.0 else None

    g = wait_until(settled, timeout=20, interval=0.2)
    assert g[f'buildq_queue_depth{{queue="{high}"}}'] == 0.0
    assert g["buildq_builds_running"] == 2.0
    assert g[f'buildq_daemon_slots_in_use{{daemon="{DAEMON}"}}'] == 2.0
    assert g[f'buildq_daemon_slots{{daemon="{DAEMON}"}}'] == 2.0
    assert g["buildq_daemons_full"] == 1.0
    assert g["buildq_workers_live"] == 1.0
    assert g["buildq_jobs_waiting_for_daemon"] == 0.0
    assert 0.0 < g["buildq_queue_oldest_age_seconds"] <= time.monotonic() - submitted + 6
    assert g["buildq_gauges_age_seconds"] < 10
    assert g[f'buildq_daemon_up{{daemon="{DAEMON}"}}'] == 1.0
    for handle in [*running, *queued]:
        handle.cancel()
    for handle in [*running, *queued]:
        assert handle.wait(timeout=60)["state"] == "cancelled"
    drained = wait_until(lambda: (x := _gauges(port)).get("buildq_builds_running") == 0.0 and x, timeout=20)
    assert drained[f'buildq_queue_depth{{queue="{queue}"}}'] == 0.0 and drained["buildq_daemons_full"] == 0.0


def test_a_job_waiting_for_a_full_daemon_is_counted(buildq_env, start_worker, context_dir, tmp_path) -> None:
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom"),
           "BUILDQ_BUILDKIT_MAX_BUILDS": "1"}  # fmt: skip
    start_worker(env, concurrency=2)
    client = client_for(env)
    first = client.submit(_hang(context_dir, "reg/holds:1"))
    wait_until(lambda: first.status()["state"] == "running", timeout=30)
    second = client.submit({"context": str(context_dir), "tags": ["reg/waits:1"]})
    # the second job finds the one slot taken, waits for it on the worker, then goes back to wait
    wait_until(lambda: second.status()["phase"] == "waiting_for_daemon", timeout=30)
    g = wait_until(
        lambda: (x := _gauges(port)).get("buildq_jobs_waiting_for_daemon") == 1.0 and x, timeout=20
    )
    assert g["buildq_daemons_full"] == 1.0 and g["buildq_builds_running"] == 1.0
    first.cancel()
    assert second.wait(timeout=60)["state"] == "succeeded"
    wait_until(lambda: _gauges(port).get("buildq_jobs_waiting_for_daemon") == 0.0, timeout=20)
