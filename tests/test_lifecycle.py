"""The lifecycle: :func:`decide` (pure, milliseconds) and the executor in this process.

The executor tests run a real :class:`~buildq.engine.runtime.PoolRuntime` (real Redis, the local
launcher, the buildctl stand-in, the process's scheduler and cancel subscription) without a Celery
worker: a delivery is popped from the queue as the worker would receive it and handed to
:meth:`Lifecycle.handle` directly.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.client import BuildqClient
from buildq.config import load_settings
from buildq.contract.wire import Delivery, read_delivery
from buildq.engine.lifecycle import (
    CANCELLED_BEFORE_START,
    LOST,
    NO_DAEMON_BUSY,
    NO_DAEMON_DOWN,
    Done,
    Drop,
    GiveUp,
    Retry,
    Situation,
    WaitForDaemon,
    decide,
)
from buildq.engine.runtime import PoolRuntime
from buildq.store.jobs import Fence
from buildq.store.keys import job_key, load_key
from tests.harness import StandinLog, base_env, wait_until
from tests.standin.scenarios import fail, flaky, hang, scenario_json, succeed

SETTINGS = load_settings({}, retry_max_attempts=3, retry_backoff_base_s=1.0, retry_backoff_cap_s=8.0,
                         daemon_wait_s=60.0)  # fmt: skip
NOW = 1_000_000.0


def situation(outcome: str, **kw: Any) -> Situation:
    return Situation(history=kw.pop("history", ()), outcome=outcome, now=kw.pop("now", NOW), **kw)


def entry(**kw: Any) -> dict[str, Any]:
    return {"reached_daemon": True, "reason": "goaway", "started_at_epoch": NOW - 10, **kw}


# -- decide ------------------------------------------------------------------------------------


def test_a_success_is_done() -> None:
    assert decide(situation("succeeded"), SETTINGS, jitter=0.5) == Done("succeeded")


def test_a_permanent_failure_a_timeout_and_a_cancel_are_done() -> None:
    assert decide(situation("failed", reason="step_failed"), SETTINGS, jitter=0.5) == Done("failed")
    assert decide(situation("timeout", transient=False), SETTINGS, jitter=0.5) == Done("failed")
    assert decide(situation("cancelled"), SETTINGS, jitter=0.5) == Done("cancelled")
    assert decide(situation(CANCELLED_BEFORE_START), SETTINGS, jitter=0.5) == Done("cancelled")


def test_a_transient_failure_is_retried_after_a_jittered_backoff() -> None:
    first = decide(situation("failed", transient=True, reason="resource_exhausted"), SETTINGS, jitter=0.5)
    assert first == Retry(delay=0.5, reason="resource_exhausted", avoid_daemon=False)
    second = decide(
        situation("failed", transient=True, reason="resource_exhausted", history=(entry(),)),
        SETTINGS, jitter=1.0,
    )  # fmt: skip
    assert isinstance(second, Retry) and second.delay == 2.0  # base 1 s doubles, times the jitter


def test_a_daemon_that_dropped_the_build_is_avoided_next_time() -> None:
    got = decide(situation("failed", transient=True, reason="goaway"), SETTINGS, jitter=0.0)
    assert got == Retry(delay=0.0, reason="goaway", avoid_daemon=True)


def test_the_last_allowed_attempt_ends_the_job() -> None:
    history = (entry(), entry())
    assert decide(
        situation("failed", transient=True, reason="goaway", history=history), SETTINGS, jitter=0.5
    ) == Done("failed")


def test_nobody_retries_a_build_whose_cancel_was_asked_for() -> None:
    s = situation("failed", transient=True, reason="goaway", cancel_requested=True)
    assert decide(s, SETTINGS, jitter=0.5) == Done("failed")


def test_a_daemon_never_reached_costs_no_attempt_until_the_wait_runs_out() -> None:
    unreached = entry(reached_daemon=False, reason="daemon_unreachable")
    history = (unreached, unreached, unreached)  # three more than the allowed attempts: not counted
    s = situation(
        "failed", transient=True, reason="daemon_unreachable", reached_daemon=False, history=history,
        started_at=NOW,
    )  # fmt: skip
    assert decide(s, SETTINGS, jitter=0.5) == Retry(0.0, "daemon_unreachable", avoid_daemon=True)
    old = (entry(reached_daemon=False, reason="daemon_unreachable", started_at_epoch=NOW - 61),)
    late = situation("failed", transient=True, reason="daemon_unreachable", reached_daemon=False, history=old,
                     started_at=NOW)  # fmt: skip
    assert decide(late, SETTINGS, jitter=0.5) == GiveUp()


def test_full_daemons_send_the_job_back_and_down_daemons_are_waited_for_up_to_the_limit() -> None:
    busy = decide(situation(NO_DAEMON_BUSY), SETTINGS, jitter=0.5)
    assert busy == WaitForDaemon(delay=2.0, waiting_since=None)
    down = decide(situation(NO_DAEMON_DOWN), SETTINGS, jitter=0.5)
    assert down == WaitForDaemon(delay=1.5, waiting_since=NOW)
    later = decide(situation(NO_DAEMON_DOWN, waiting_since=NOW - 59.5), SETTINGS, jitter=0.5)
    assert later == WaitForDaemon(delay=0.5, waiting_since=NOW - 59.5)
    assert decide(situation(NO_DAEMON_DOWN, waiting_since=NOW - 60), SETTINGS, jitter=0.5) == GiveUp()


def test_a_fenced_out_run_is_dropped() -> None:
    assert isinstance(decide(situation("lease_lost"), SETTINGS, jitter=0.5), Drop)


def test_lost_attempts_count_until_there_are_none_left() -> None:
    lost = {"reached_daemon": True, "reason": "worker_lost"}
    assert decide(situation(LOST, history=(lost,)), SETTINGS, jitter=0.5) == Retry(0.0, "worker_lost")
    assert decide(situation(LOST, history=(lost, lost, lost)), SETTINGS, jitter=0.5) == Done("failed")


# -- the executor, in this process -------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, standin: Path, standin_log: StandinLog) -> Iterator[dict[str, str]]:
    values = base_env(14, "lc", BUILDQ_BUILDCTL_PATH=str(standin), BUILDQ_LOCAL_STATE_DIR=str(tmp_path / "s"),
                      BUILDQ_LEASE_TTL_S="0.6", BUILDQ_BUILDKIT_HOSTS="tcp://d0:1,tcp://d1:1",
                      BUILDQ_BUILDKIT_MAX_BUILDS="1")  # fmt: skip
    client = redis.Redis.from_url(values["BUILDQ_BROKER_URL"])
    client.flushdb()
    yield values
    client.flushdb()
    client.close()


def runtime_of(env: dict[str, str], standin_log: StandinLog, **settings: Any) -> PoolRuntime:
    import os

    os.environ["STANDIN_LOG"] = str(standin_log.path)
    return PoolRuntime(load_settings({k: v for k, v in env.items() if k.startswith("BUILDQ_")}, **settings))


@pytest.fixture
def runtime(env: dict[str, str], standin_log: StandinLog) -> Iterator[PoolRuntime]:
    rt = runtime_of(env, standin_log)
    yield rt
    rt.close()


def job(job_id: str, context: Path, scenario: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    args = {"STANDIN_SCENARIO": scenario_json(scenario)} if scenario else {}
    return {
        "job_id": job_id,
        "context": str(context),
        "tags": ["127.0.0.1:5000/t/app:1"],
        "build_args": args,
        **kw,
    }


def deliver(r: redis.Redis, queue: str = "lc") -> Delivery:
    """The oldest message of ``queue`` as a worker receives it."""
    raw = r.rpop(queue)
    assert raw is not None, "no message in the queue"
    message = json.loads(raw)
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    headers = message["headers"]
    return read_delivery(tuple(args), kwargs, task_id=headers["id"], queue=queue, retries=headers["retries"])


def test_a_job_is_built_and_its_record_is_on_the_server_clock(runtime, env, context_dir, standin_log) -> None:
    client = BuildqClient(runtime.settings)
    client.submit(job("ok1", context_dir))
    ending = runtime.lifecycle.handle(deliver(runtime.store.redis))
    assert ending.kind == "finished" and ending.record is not None
    record = ending.record
    assert record["state"] == "succeeded" and len(record["attempts"]) == 1
    assert record["image"]["digest"] and ending.summary == {**ending.summary, "state": "succeeded"}
    server = runtime.store.redis.time()[0]
    finished = time.mktime(time.strptime(record["finished_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(finished - server) < 5
    assert client.wait("ok1", timeout=5)["state"] == "succeeded"
    assert len(standin_log.ends()) == 1


def test_a_retry_carries_its_history_in_redis_and_the_old_message_is_stale(
    runtime, env, context_dir, tmp_path
) -> None:
    client = BuildqClient(runtime.settings)
    client.submit(job("rt1", context_dir, flaky(tmp_path / "flaky", fail_first=1)))
    first = deliver(runtime.store.redis)
    ending = runtime.lifecycle.handle(first)
    assert ending.kind == "requeued"
    info = runtime.store.info("rt1")
    assert info["phase"] == "retry_wait" and len(json.loads(info["attempts"])) == 1
    second = deliver(runtime.store.redis)
    assert second.delivery != first.delivery
    assert runtime.lifecycle.handle(first).kind == "dropped"  # the old message again: not current
    done = runtime.lifecycle.handle(second)
    assert done.kind == "finished" and done.record is not None
    assert [a["outcome"] for a in done.record["attempts"]] == ["failed", "succeeded"]


def test_a_forged_message_cannot_supply_history(runtime, env, context_dir) -> None:
    """Attempts, waits and times in a message are read past: the record has only what workers wrote."""
    client = BuildqClient(runtime.settings)
    client.submit(job("fg1", context_dir))
    d = deliver(runtime.store.redis)
    forged = read_delivery(
        (), {"job": d.job, "delivery": d.delivery, "enqueued_at": "x",
             "attempts": [{"number": 7, "started_at": "2001-01-01T00:00:00.000Z"}], "window_start": 1.0},
        task_id=d.task_id, queue=d.queue,
    )  # fmt: skip
    ending = runtime.lifecycle.handle(forged)
    assert ending.record is not None and ending.record["state"] == "succeeded"
    assert [a["number"] for a in ending.record["attempts"]] == [1]
    assert not ending.record["enqueued_at"].startswith("1970")


def test_a_stale_holder_is_fenced_out_and_stores_nothing(runtime, env, context_dir, standin_log) -> None:
    """The holder stalls; another delivery claims the job: the old run is stopped at its next
    renewal and its finish writes nothing."""
    client = BuildqClient(runtime.settings)
    client.submit(job("st1", context_dir, succeed(sleep_s=2.0)))
    d = deliver(runtime.store.redis)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(ending=runtime.lifecycle.handle(d)))
    thread.start()
    wait_until(lambda: standin_log.starts(), timeout=10)
    r = runtime.store.redis
    r.hset(job_key("st1"), "lease_until", 0)  # as if the holder stalled past its lease
    took = runtime.store.claim(
        "st1", delivery=d.delivery, daemons=["tcp://d0:1", "tcp://d1:1"], limit=2, ttl_s=30,
        worker="other:1", domain="other", body="{}", queue="lc",
    )  # fmt: skip
    thread.join(10)
    assert result["ending"].kind == "dropped"
    assert runtime.store.result("st1") is None
    assert runtime.store.lease_holder("st1") == took.token  # type: ignore[union-attr]
    assert not [e for e in standin_log.ends() if e.get("rc") == 0]  # killed before it finished


def test_the_lease_is_held_throughout_a_build_longer_than_its_ttl(runtime, env, context_dir) -> None:
    """Renewed every third of the TTL for as long as buildctl runs, not once."""
    client = BuildqClient(runtime.settings)
    client.submit(job("ls1", context_dir, succeed(sleep_s=2.5)))
    d = deliver(runtime.store.redis)
    seen: list[int] = []
    thread = threading.Thread(target=lambda: runtime.lifecycle.handle(d))
    thread.start()
    r = runtime.store.redis

    def left_ms() -> int:  # how long the lease has to run, by the server clock
        until, _ = r.hmget(job_key("ls1"), ["lease_until", "record"])
        sec, usec = r.time()
        return int(until or 0) - (sec * 1000 + usec // 1000)

    wait_until(lambda: left_ms() > 0, timeout=5)
    while not r.hexists(job_key("ls1"), "record") and thread.is_alive():
        seen.append(left_ms())
        time.sleep(0.05)
    thread.join(10)
    assert runtime.store.result("ls1")["state"] == "succeeded"
    during = seen[:-3]  # the lease goes with the result
    assert len(during) > 20 and min(during) > 0, seen


def test_a_cancel_notice_stops_a_running_build_within_two_seconds(
    runtime, env, context_dir, standin_log
) -> None:
    client = BuildqClient(runtime.settings)
    client.submit(job("cx1", context_dir, hang()))
    d = deliver(runtime.store.redis)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(ending=runtime.lifecycle.handle(d)))
    thread.start()
    wait_until(lambda: standin_log.starts(), timeout=10)
    asked = time.monotonic()
    client.cancel("cx1")
    thread.join(10)
    assert time.monotonic() - asked < 2.0
    assert result["ending"].record["state"] == "cancelled"


def test_a_retry_waiting_for_a_slot_avoids_the_daemon_that_dropped_it(env, context_dir, standin_log) -> None:
    """The retry finds every daemon full and waits; when slots free up, the daemon that dropped its
    last attempt is the least loaded, and is still not taken while another has room."""
    daemons = ["tcp://d0:1", "tcp://d1:1", "tcp://d2:1"]
    rt = runtime_of(env, standin_log, buildkit_hosts=daemons, buildkit_max_builds=2)
    try:
        client = BuildqClient(rt.settings)
        goaway = (
            "failed to receive status: rpc error: code = Unavailable desc = closing transport due to: EOF"
        )
        client.submit(job("av1", context_dir, fail(error=goaway)))
        first = rt.lifecycle.handle(deliver(rt.store.redis))
        assert first.kind == "requeued"
        lost_on = json.loads(rt.store.info("av1")["attempts"])[0]["daemon"]
        r = rt.store.redis
        index = load_key(daemons)
        r.zadd(index, {daemon: 2 for daemon in daemons})  # every daemon full: the retry waits for a slot

        def free() -> None:  # the dropped daemon empties, the others keep one build each
            r.zadd(index, {daemon: 0 if daemon == lost_on else 1 for daemon in daemons})

        threading.Timer(0.5, free).start()
        assert rt.lifecycle.handle(deliver(rt.store.redis)).kind == "requeued"  # it fails again
        second = json.loads(rt.store.info("av1")["attempts"])[1]
        assert second["daemon"] not in (None, lost_on)
    finally:
        rt.close()


def test_an_attempt_lost_with_its_worker_is_recorded_and_counted(env, context_dir, standin_log) -> None:
    rt = runtime_of(env, standin_log, retry_max_attempts=1)
    try:
        client = BuildqClient(rt.settings)
        client.submit(job("lw1", context_dir))
        d = deliver(rt.store.redis)
        dead = rt.store.claim(
            "lw1", delivery=d.delivery, daemons=["tcp://d0:1"], limit=1, ttl_s=30, worker="dead:1",
            domain="elsewhere", body="{}", queue="lc",
        )  # fmt: skip
        rt.store.redis.hset(job_key("lw1"), "lease_until", 0)  # its worker died: the lease expired
        assert dead is not None
        ending = rt.lifecycle.handle(d)
        record = ending.record or {}
        assert record["state"] == "failed" and record["error"]["reason"] == "worker_lost"
        assert [a["outcome"] for a in record["attempts"]] == ["lost"]
        assert standin_log.starts() == []  # no attempt left: nothing launched
    finally:
        rt.close()


def test_an_unexpected_error_gives_the_claim_back_and_the_next_claim_records_it(
    runtime, env, context_dir, monkeypatch
) -> None:
    client = BuildqClient(runtime.settings)
    client.submit(job("ue1", context_dir))
    d = deliver(runtime.store.redis)

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("launcher exploded")

    monkeypatch.setattr(runtime.launcher, "start", broken)
    with pytest.raises(RuntimeError):
        runtime.lifecycle.handle(d)
    assert runtime.store.lease_holder("ue1") is None
    monkeypatch.undo()
    ending = runtime.lifecycle.handle(d)
    record = ending.record or {}
    assert record["state"] == "succeeded"
    assert (
        record["attempts"][0]["outcome"] == "lost" and "launcher exploded" in record["attempts"][0]["error"]
    )


def test_an_invalid_job_is_rejected_without_a_launch(runtime, env, standin_log) -> None:
    d = read_delivery((), {"job": {"job_id": "bad1", "context": "/nope", "tags": ["x:1\n"]}},
                      task_id="bad1", queue="lc")  # fmt: skip
    ending = runtime.lifecycle.handle(d)
    assert ending.record is not None and ending.record["error"]["field"] == "tags"
    assert runtime.store.result("bad1")["error"]["kind"] == "invalid"
    assert standin_log.starts() == [] and runtime.store.lease_holder("bad1") is None


def test_a_forged_invalid_message_cannot_fail_another_job(runtime, env, context_dir, standin_log) -> None:
    client = BuildqClient(runtime.settings)
    client.submit(job("victim1", context_dir))
    forged = read_delivery(
        (), {"job": {"job_id": "victim1", "context": "relative"}}, task_id="victim1", queue="lc"
    )
    assert runtime.lifecycle.handle(forged).kind == "dropped"
    weird = read_delivery(
        (), {"job": {"job_id": "victim1:*\n../../x"}}, task_id="victim1:*\n../../x", queue="lc"
    )
    assert runtime.lifecycle.handle(weird).kind == "dropped"
    assert runtime.store.result("victim1") is None and runtime.store.info("victim1")["state"] == "queued"
    ending = runtime.lifecycle.handle(deliver(runtime.store.redis))
    assert ending.record is not None and ending.record["state"] == "succeeded"


def test_a_release_after_a_stale_fence_changes_nothing(runtime) -> None:
    assert not runtime.store.release(Fence("none", "tok", 9))


def test_a_takeover_from_another_host_waits_until_its_run_is_known_dead(
    runtime, env, context_dir, standin_log
) -> None:
    client = BuildqClient(runtime.settings)
    client.submit(job("tk1", context_dir))
    d = deliver(runtime.store.redis)
    runtime.store.claim(
        "tk1", delivery=d.delivery, daemons=["tcp://d0:1"], limit=1, ttl_s=30, worker="b@other",
        domain="other-host", body="{}", queue="lc",
    )  # fmt: skip
    runtime.store.heartbeat(worker="b@other", domain="other-host", ttl_s=30)  # that host still lives
    runtime.store.redis.hset(job_key("tk1"), "lease_until", 0)  # its claim expired: the job is up for grabs
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(ending=runtime.lifecycle.handle(d)))
    thread.start()
    time.sleep(0.5)
    assert standin_log.starts() == []  # not while the other host's run may still go on
    runtime.store.mark_dead("tk1", 1)  # that host's reaper killed it
    thread.join(10)
    assert result["ending"].record["state"] == "succeeded"
    assert [a["outcome"] for a in result["ending"].record["attempts"]] == ["lost", "succeeded"]


def test_a_registry_away_is_waited_out_past_the_attempts_then_fails() -> None:
    away = {"reached_daemon": True, "reason": "registry_unavailable"}
    history = tuple({**away, "started_at_epoch": NOW - 300 + i} for i in range(6))  # more than 3 attempts
    s = situation("failed", transient=True, reason="registry_unavailable", history=history, started_at=NOW)
    got = decide(s, SETTINGS, jitter=1.0)
    assert isinstance(got, Retry) and got.delay == SETTINGS.retry_backoff_cap_s  # backing off to the cap
    late = situation("failed", transient=True, reason="registry_unavailable", history=history, now=NOW + 301,
                     started_at=NOW + 300)  # fmt: skip
    assert decide(late, SETTINGS, jitter=1.0) == Done("failed")  # BUILDQ_REGISTRY_WAIT_S (600) passed


def test_registry_waits_use_none_of_the_attempts() -> None:
    away = {"reached_daemon": True, "reason": "registry_unavailable", "started_at_epoch": NOW - 5}
    failed = entry(reason="goaway")
    s = situation("failed", transient=True, reason="goaway", history=(away, away, away, failed))
    assert isinstance(decide(s, SETTINGS, jitter=0.5), Retry)  # only the goaway counted: 2 of 3
