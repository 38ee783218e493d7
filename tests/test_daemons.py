"""A BuildKit daemon restart is waited out, not raced (issue: no GOAWAY ever fails a build).

Pure parts over data, the circuit breaker and the claim against a real Redis, the give-up of a job
whose daemons are all down (in this process), the probe through the local launcher and the
stand-in's simulated daemons, and whole builds through real workers
while a simulated daemon restarts (GOAWAY, then refused for 20 s and 60 s, then fine).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.buildkit.classify import classify_failure
from buildq.buildkit.progress import ProgressTracker
from buildq.client import BuildqClient
from buildq.engine.daemonwatch import DaemonWatch
from buildq.engine.lifecycle import counts_as_attempt, unreached_since
from buildq.launchers.local import LocalLauncher
from buildq.store.daemons import DaemonHealth, DaemonState
from buildq.store.jobs import Claimed, JobStore
from buildq.store.keys import job_key, load_key
from tests.conftest import FIXTURES, scenario
from tests.harness import REDIS_URL, StandinLog, client_for, simulated_deployment, wait_until
from tests.inprocess import deliver, pool_env, pool_runtime
from tests.standin.scenarios import daemon_dials, daemon_down, daemon_invocations

A, B = "tcp://127.0.0.1:1234", "tcp://127.0.0.1:1236"
DB_URL = f"{REDIS_URL}/13"


def stream(name: str) -> tuple[int, list[str]]:
    path = FIXTURES / "errors" / name
    return int(path.with_suffix(".rc").read_text()), path.with_suffix(".stderr").read_text().splitlines()


def reached(name: str) -> tuple[str, bool]:
    """(reason, reached the daemon) as the runner decides them for a captured run."""
    rc, lines = stream(name)
    tracker = ProgressTracker()
    for line in lines:
        tracker.feed(line)
    failure = classify_failure(rc, tracker.text_lines, vertex_errors=tracker.vertex_errors())
    assert failure is not None
    return failure.reason, not (failure.reason == "daemon_unreachable" and tracker.json_lines == 0)


# -- pure ------------------------------------------------------------------------------------


def test_refused_dial_never_reached_the_daemon_but_goaway_did() -> None:
    assert reached("err_i_refused_tcp_rawjson") == ("daemon_unreachable", False)
    assert reached("err_iii_sigterm_sigkill_plain") == ("goaway", True)


def test_attempts_that_never_reached_a_daemon_do_not_count() -> None:
    # (the lifecycle gives each entry its start as epoch seconds, ``started_at_epoch``)
    refused = {"reached_daemon": False, "reason": "daemon_unreachable", "started_at_epoch": 5.0}
    docker_down = {"reached_daemon": False, "reason": "docker_unavailable", "started_at_epoch": 4.0}
    goaway = {"reached_daemon": True, "reason": "goaway", "started_at_epoch": 1.0}
    assert not counts_as_attempt(refused)
    assert counts_as_attempt(goaway) and counts_as_attempt(docker_down)
    assert counts_as_attempt({"reason": "daemon_unreachable"})  # records from before the field
    first = {**refused, "started_at_epoch": 3.0}
    # the trailing run of unreached attempts began with ``first``; the current one is one of them
    assert unreached_since([goaway, first, refused], 9.0) == 3.0
    assert unreached_since([goaway], 9.0) == 9.0  # only the current attempt never reached one
    assert unreached_since([refused, goaway], None) is None


# -- breaker and claim against Redis ---------------------------------------------------------


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(DB_URL)
    r.flushdb()
    yield r
    r.flushdb()


def test_the_breaker_reports_each_transition_once(client: redis.Redis) -> None:
    health = DaemonHealth(client)
    assert health.mark_down(A, "refused", 100.0) is True
    assert health.mark_down(A, "refused again", 101.0) is False  # already open: nobody else announces
    assert health.down() == {A: 100.0}
    assert health.states([A, B]) == [
        DaemonState(A, False, 100.0, "refused again"),
        DaemonState(B, True, None, None),
    ]
    assert health.mark_up(A, 130.0) == pytest.approx(30.0)
    assert health.mark_up(A, 131.0) is None
    assert health.states([A]) == [DaemonState(A, True, 130.0, None)]


def test_one_probe_at_a_time(client: redis.Redis) -> None:
    health = DaemonHealth(client)
    assert health.try_probe(A, 5)
    assert not health.try_probe(A, 5)
    assert health.try_probe(B, 5)
    health.probe_done(A, 0.05)
    wait_until(lambda: health.try_probe(A, 5), timeout=2)


def test_the_claim_skips_a_down_daemon_and_a_retry_avoids_the_lost_one(client: redis.Redis) -> None:
    store = JobStore(client, result_ttl_s=60)
    health = DaemonHealth(client)

    def claim(job_id: str, avoid: str | None = None) -> Claimed:
        if avoid is not None:  # written by the worker that requeued the job after losing it there
            client.hset(job_key(job_id), "avoid", avoid)
        got = store.claim(job_id, delivery="", daemons=[A, B], limit=2, ttl_s=30, worker="w:1",
                          domain="h", body="{}", queue="q")  # fmt: skip
        assert isinstance(got, Claimed)
        return got

    health.mark_down(A, "refused", 1.0)
    assert claim("j1").daemon == B
    health.mark_down(B, "refused", 1.0)
    all_down = claim("j2")
    assert all_down.daemon is None and store.lease_holder("j2") == all_down.token  # all down
    health.mark_up(A, 2.0)
    health.mark_up(B, 2.0)
    # equally loaded would pick A (first in the index); A is avoided while B has room, taken when B is full
    client.zadd(load_key([A, B]), {A: 0, B: 0})
    assert claim("j3", avoid=A).daemon == B
    assert claim("j4", avoid=A).daemon == B
    assert claim("j5", avoid=A).daemon == A


# -- every daemon down: the wait and the give-up, in this process ----------------------------


def test_a_job_waits_while_every_daemon_is_down_then_fails_naming_each(
    standin: Path, standin_log: StandinLog, context_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_LOG", str(standin_log.path))
    env = pool_env(18, "dmn", standin, tmp_path / "state", BUILDQ_BUILDKIT_HOSTS=f"{A},{B}",
                   BUILDQ_DAEMON_WAIT_S="1")  # fmt: skip
    with pool_runtime(env) as rt:
        r = rt.store.redis
        health = DaemonHealth(r)
        health.mark_down(A, "connect: connection refused", time.time() - 612)
        health.mark_down(B, "", time.time() - 100)
        BuildqClient(rt.settings).submit({"job_id": "nod1", "context": str(context_dir), "tags": ["reg/n:1"]})
        first = rt.lifecycle.handle(deliver(r, "dmn"))
        assert (first.kind, first.reason) == ("requeued", "waiting_for_daemon")
        assert 0.1 <= first.countdown <= 1.0  # within what is left of the wait
        info = rt.store.info("nod1")
        assert info["phase"] == "waiting_for_daemon" and json.loads(info["attempts"]) == []
        since = float(info["waiting_since"])  # on the server clock, kept by the workers
        assert abs(since - r.time()[0]) < 5
        time.sleep(1.1)
        ending = rt.lifecycle.handle(deliver(r, "dmn"))
        record = ending.record
        assert ending.kind == "finished" and record is not None
        assert record["state"] == "failed" and record["error"]["kind"] == "daemon_unavailable"
        assert record["attempts"] == [] and standin_log.starts() == []  # nothing was launched
        assert re.fullmatch(
            r"no BuildKit daemon answered within BUILDQ_DAEMON_WAIT_S=1s: "
            r"tcp://127\.0\.0\.1:1234 down for 61[234]s \(connect: connection refused\); "
            r"tcp://127\.0\.0\.1:1236 down for (99|100|101|102)s \(no answer\)",
            record["error"]["message"],
        ), record["error"]["message"]
        stored = rt.store.result("nod1")
        assert stored is not None and stored["error"]["message"] == record["error"]["message"]


# -- the probe through a launcher ------------------------------------------------------------


def test_the_watch_closes_the_breaker_when_the_daemon_answers(
    client: redis.Redis, standin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemons = tmp_path / "daemons"
    monkeypatch.setenv("STANDIN_DAEMONS_DIR", str(daemons))
    health = DaemonHealth(client)
    launcher = LocalLauncher(str(standin), state_dir=str(tmp_path / "state"))
    announced: list[tuple[str, float]] = []
    watch = DaemonWatch(
        health, launcher, [A, B], announce=lambda d, s: announced.append((d, s)), interval_s=0.05
    )
    other = DaemonWatch(health, launcher, [A, B], interval_s=0.05)
    assert watch.tick() == [] and watch.probes == 0  # nothing is down: nothing probed
    until = daemon_down(daemons, A, 1.0)
    health.mark_down(A, "refused", time.time())
    assert watch.tick() == [] and watch.probes == 1  # refused: still down
    assert other.tick() == [] and other.probes == 0  # the probe lock: one probe at a time
    wait_until(lambda: time.time() > until + 0.05, timeout=5)
    wait_until(lambda: watch.tick() == [A], timeout=5)
    assert [d for d, _ in announced] == [A] and announced[0][1] >= 1.0
    assert health.down() == {}
    assert {e["cmd"] for e in daemon_invocations(daemons, A)} == {"debug-workers"}  # probes, not builds


# -- whole builds through real workers -------------------------------------------------------


def deployment(standin: Path, db: int, daemons_dir: Path, hosts: str, **extra: str) -> dict[str, str]:
    return simulated_deployment(standin, db, daemons_dir, hosts, **extra)


def job(context_dir: Path, tag: str, sleep_s: float = 0.0) -> dict[str, Any]:
    spec = scenario(kind="succeed", sleep_s=sleep_s) if sleep_s else scenario(kind="succeed")
    return {"context": str(context_dir), "tags": [tag], "build_args": {"STANDIN_SCENARIO": spec}}


def builds_while_down(daemons_dir: Path, addr: str, since: float, until: float) -> list[dict[str, Any]]:
    return [
        e for e in daemon_invocations(daemons_dir, addr) if e["cmd"] == "build" and since <= e["t"] < until
    ]


def test_a_restart_of_20s_and_one_of_60s_are_waited_out(standin, context_dir, tmp_path, start_worker) -> None:
    runs = []
    for db, outage, addr in ((2, 20.0, A), (4, 60.0, B)):
        daemons = tmp_path / f"daemons-{db}"
        env = deployment(standin, db, daemons, addr, BUILDQ_RETRY_MAX_ATTEMPTS="3")
        start_worker(env, concurrency=2)
        handle = client_for(env).submit(job(context_dir, f"reg/restart{db}:1", sleep_s=8.0))
        runs.append((daemons, addr, outage, env, handle))
    for daemons, addr, _outage, _env, _handle in runs:  # both builds reached their daemon
        wait_until(lambda d=daemons, a=addr: any(e["cmd"] == "build" for e in daemon_dials(d, a)), timeout=90)
    downs = [(daemon_down(daemons, addr, outage), time.time()) for daemons, addr, outage, _e, _h in runs]
    for (daemons, addr, outage, env, handle), (until, since) in zip(runs, downs, strict=True):
        record = handle.wait(timeout=outage + 60)
        assert record["state"] == "succeeded", record.get("error")
        first, *rest = record["attempts"]
        assert first["reason"] == "goaway" and first["reached_daemon"] is True
        assert rest[-1]["outcome"] == "succeeded"
        assert sum(1 for a in record["attempts"] if counts_as_attempt(a)) <= 3
        launched = builds_while_down(daemons, addr, since + 0.5, until)
        assert len(launched) <= 2, launched  # a handful at most; the probes are not builds
        # the wait shows as queue time of the attempt that succeeded
        assert rest[-1]["phases"]["queued"] >= outage - 2
        assert DaemonHealth(redis.Redis.from_url(env["BUILDQ_BROKER_URL"])).down() == {}


def test_with_one_of_two_daemons_down_new_builds_go_to_the_live_one(
    standin, context_dir, tmp_path, start_worker
) -> None:
    daemons = tmp_path / "daemons"
    env = deployment(standin, 6, daemons, f"{A},{B}")
    start_worker(env, concurrency=2)
    client = client_for(env)
    daemon_down(daemons, A, 120.0)
    started = time.time()
    handles = [client.submit(job(context_dir, f"reg/two{i}:1")) for i in range(8)]
    records = [h.wait(timeout=60) for h in handles]
    assert all(r["state"] == "succeeded" for r in records), [r.get("error") for r in records]
    assert all(r["attempts"][-1]["daemon"] == B for r in records)
    refused = [a for r in records for a in r["attempts"] if a["reason"] == "daemon_unreachable"]
    assert all(a["daemon"] == A and a["reached_daemon"] is False for a in refused)
    assert len(builds_while_down(daemons, A, started, started + 120)) <= 3
    assert max(r["duration_s"] for r in records) < 30  # no one waited for A to come back
    health = DaemonHealth(redis.Redis.from_url(env["BUILDQ_BROKER_URL"]))
    assert list(health.down()) == [A]


def test_all_daemons_down_past_the_wait_fails_once_with_a_clear_error(
    standin, context_dir, tmp_path, start_worker
) -> None:
    daemons = tmp_path / "daemons"
    env = deployment(standin, 8, daemons, f"{A},{B}", BUILDQ_DAEMON_WAIT_S="4")
    start_worker(env, concurrency=2)
    daemon_down(daemons, A, 300.0)
    daemon_down(daemons, B, 300.0)
    client = client_for(env)
    handle = client.submit(job(context_dir, "reg/none:1"))
    seen = wait_until(lambda: client.status(handle.job_id).get("phase") == "waiting_for_daemon", timeout=30)
    assert seen
    record = handle.wait(timeout=60)
    assert record["state"] == "failed"
    assert record["error"]["kind"] == "daemon_unavailable"
    message = record["error"]["message"]
    assert "BUILDQ_DAEMON_WAIT_S=4s" in message and A in message and B in message
    assert "connection refused" in message
    assert all(not counts_as_attempt(a) for a in record["attempts"])
    time.sleep(2)  # failed once: no second record, no more builds
    assert client.status(handle.job_id)["error"] == record["error"]


def test_a_daemon_with_a_full_disk_is_held_out_and_its_builds_move_to_the_healthy_one(
    standin, context_dir, tmp_path, start_worker
) -> None:
    """The genuine "no space left on device" of a full daemon (it still answers probes) is the
    daemon's fault: transient for the job, the daemon's breaker open and held, builds moved."""
    from tests.standin.scenarios import daemon_disk_full

    daemons = tmp_path / "daemons"
    env = deployment(standin, 10, daemons, f"{A},{B}", BUILDQ_DAEMON_HOLD_S="120")
    start_worker(env, concurrency=2)
    daemon_disk_full(daemons, A)
    client = client_for(env)
    handles = [client.submit(job(context_dir, f"reg/full{i}:1")) for i in range(12)]
    records = [h.wait(timeout=90) for h in handles]
    assert [r["state"] for r in records] == ["succeeded"] * 12, [r.get("error") for r in records]
    assert all(r["attempts"][-1]["daemon"] == B for r in records)
    failed_on_a = [a for r in records for a in r["attempts"] if a["daemon"] == A]
    assert all(a["reason"] == "daemon_storage" for a in failed_on_a)
    assert len([e for e in daemon_invocations(daemons, A) if e["cmd"] == "build"]) <= 2  # not 10 of 12
    health = DaemonHealth(redis.Redis.from_url(env["BUILDQ_BROKER_URL"]))
    (state,) = [s for s in health.states([A, B]) if s.daemon == A]
    assert not state.up and "no space left on device" in (state.error or "")
    assert health.held(A)  # the probes answer, yet it stays out
