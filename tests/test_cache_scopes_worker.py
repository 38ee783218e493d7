"""Cache scopes, the export lease and superseded builds through real workers (real Redis, real Celery
pool processes, the buildctl stand-in): the argv a scoped build runs, a build that skips its export
because of the lease, builds of one ref exporting one after another, a running build killed by a
newer submit of its supersede key (its slot freed), and a stranger's raw messages."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from buildq.celeryapp.app import create_app
from buildq.contract.job import cache_key, new_job_id, parse_job
from buildq.store.keys import export_lease_key
from tests.conftest import scenario
from tests.harness import client_for, free_port, run_cli, settings_from, simulated_deployment, wait_until
from tests.test_observability import scrape
from tests.test_reliability import pid_alive

TAG = "reg:5000/team/app:1"
DAEMON_A, DAEMON_B = "tcp://127.0.0.1:1234", "tcp://127.0.0.1:1236"


def flags(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def state_redis(env: dict[str, str]) -> redis.Redis:
    settings = settings_from(env)
    return redis.Redis.from_url(settings.redis_url or settings.broker_url)


def test_a_scoped_build_imports_its_scope_then_main_and_exports_to_its_scope(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    env = {**buildq_env, "BUILDQ_CACHE_DEFAULT_SCOPE": "main"}
    start_worker(env)
    client = client_for(env)
    record = client.submit({"context": str(context_dir), "tags": [TAG], "cache_scope": "Feature/Login"}).wait(
        60
    )
    assert record["state"] == "succeeded", record["error"]
    argv = standin_log.starts()[0]["argv"]
    assert flags(argv, "--import-cache") == [
        "type=registry,ref=reg:5000/team/app:buildcache-feature-login",
        "type=registry,ref=reg:5000/team/app:buildcache-main",
    ]
    assert [a.split(",")[1] for a in flags(argv, "--export-cache")] == [
        "ref=reg:5000/team/app:buildcache-feature-login"
    ]
    assert record["cache"]["ref"] == "reg:5000/team/app:buildcache-feature-login"
    assert record["cache"]["imports"] == [
        "reg:5000/team/app:buildcache-feature-login",
        "reg:5000/team/app:buildcache-main",
    ]
    assert record["cache"]["export"] == "exported"
    # the lease was given back, and says this build exported last
    lease = state_redis(env).hgetall(export_lease_key(cache_key(parse_job(
        {"context": "/c", "tags": [TAG], "cache_scope": "feature-login"}))))  # fmt: skip
    assert lease[b"until"] == b"0" and lease[b"done_job"] == record["job_id"].encode()


def test_a_build_older_than_the_ref_s_exporter_skips_its_export(
    buildq_env, start_worker, context_dir, standin_log, tmp_path
) -> None:
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom")}
    start_worker(env)
    client = client_for(env)
    key = cache_key(parse_job({"context": "/c", "tags": [TAG], "cache_scope": "main"}))
    # another worker of the deployment builds a newer commit of main, exporting now
    r = state_redis(env)
    r.hset(export_lease_key(key), mapping={"job": "newer-job", "order": time.time() + 3600,
                                          "until": (time.time() + 3600) * 1000})  # fmt: skip
    record = client.submit({"context": str(context_dir), "tags": [TAG], "cache_scope": "main"}).wait(60)
    assert record["state"] == "succeeded", record["error"]
    assert record["cache"]["export"] == "skipped_newer"
    assert record["cache"]["exported"] is False and record["cache"]["error"] is None
    argv = standin_log.starts()[0]["argv"]
    assert flags(argv, "--export-cache") == [] and len(flags(argv, "--import-cache")) == 1
    assert r.hget(export_lease_key(key), "job") == b"newer-job"  # not its to give back
    # counted once the record is stored (the hook runs after the write)
    wait_until(lambda: scrape(port)['buildq_cache_exports_total{outcome="skipped_newer"}'] == 1.0)


def test_a_newer_build_waits_for_the_older_exporter_then_exports_after_it(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    env = {**buildq_env, "BUILDQ_CACHE_EXPORT_WAIT_S": "60", "BUILDQ_BUILDKIT_MAX_BUILDS": "4"}
    start_worker(env, concurrency=2)
    client = client_for(env)
    slow = scenario(kind="succeed", sleep_s=3.0)
    job = {"context": str(context_dir), "tags": [TAG], "cache_scope": "main"}
    older = client.submit({**job, "build_args": {"STANDIN_SCENARIO": slow}})
    wait_until(lambda: standin_log.starts(), timeout=30)
    newer = client.submit(job)
    first, second = older.wait(60), newer.wait(60)
    assert first["cache"]["export"] == second["cache"]["export"] == "exported"
    # the newer one launched only once the older one's run (and its export) had ended: one exporter
    starts = standin_log.starts()
    assert len(starts) == 2 and all(flags(s["argv"], "--export-cache") for s in starts)
    ended = {e["pid"]: e["ended"] for e in standin_log.ends()}
    assert starts[1]["started"] >= ended[starts[0]["pid"]]


def test_an_older_exporter_makes_the_newer_build_skip_at_once_by_default(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    env = buildq_env  # BUILDQ_CACHE_EXPORT_WAIT_S 0 (the default): no wait at all
    start_worker(env)
    key = cache_key(parse_job({"context": "/c", "tags": [TAG], "cache_scope": "main"}))
    r = state_redis(env)
    r.hset(
        export_lease_key(key),
        mapping={"job": "older-job", "order": 1.0, "until": (time.time() + 3600) * 1000},
    )
    record = (
        client_for(env).submit({"context": str(context_dir), "tags": [TAG], "cache_scope": "main"}).wait(60)
    )
    assert record["state"] == "succeeded" and record["cache"]["export"] == "skipped_busy"
    assert flags(standin_log.starts()[0]["argv"], "--export-cache") == []


def test_a_newer_submit_kills_the_running_build_of_its_key_within_two_seconds(
    buildq_env, start_worker, context_dir, standin_log, tmp_path
) -> None:
    port = free_port()
    # one daemon slot: the newer build runs only once the superseded one gave its slot back
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom"),
           "BUILDQ_BUILDKIT_MAX_BUILDS": "1"}  # fmt: skip
    start_worker(env, concurrency=2)
    client = client_for(env)
    job: dict[str, Any] = {"context": str(context_dir), "tags": [TAG], "supersede_key": "team/app:main"}
    older = client.submit({**job, "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")}})
    started = wait_until(lambda: standin_log.starts(), timeout=30)[0]
    t0 = time.monotonic()
    newer = client.submit(job)
    wait_until(lambda: not pid_alive(started["pid"]), timeout=2.5)
    assert time.monotonic() - t0 < 2.5
    record = older.wait(10)
    assert record["state"] == "cancelled" and record["superseded_by"] == newer.job_id
    assert record["error"]["kind"] == "cancelled" and len(record["attempts"]) == 1
    assert newer.wait(60)["state"] == "succeeded"  # it got the one slot
    assert len(standin_log.starts()) == 2
    samples = wait_until(
        lambda: scrape(port).get('buildq_superseded_total{was="running"}') == 1.0 and scrape(port)
    )
    assert samples['buildq_superseded_total{was="queued"}'] == 0.0


def test_a_queued_build_superseded_never_starts_and_a_finished_one_is_untouched(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    start_worker(buildq_env, concurrency=1)
    client = client_for(buildq_env)
    done = client.submit({"context": str(context_dir), "tags": ["reg/app:0"], "supersede_key": "k"}).wait(60)
    blocker = client.submit({"context": str(context_dir), "tags": ["reg/block:1"],
                             "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")}})  # fmt: skip
    wait_until(lambda: len(standin_log.starts()) == 2, timeout=30)
    queued = client.submit({"context": str(context_dir), "tags": ["reg/app:1"], "supersede_key": "k"})
    newest = client.submit({"context": str(context_dir), "tags": ["reg/app:2"], "supersede_key": "k"})
    assert client.status(queued.job_id)["state"] == "queued"
    blocker.cancel()
    record = queued.wait(30)
    assert record["state"] == "cancelled" and record["superseded_by"] == newest.job_id
    assert record["attempts"] == []
    assert newest.wait(60)["state"] == "succeeded"
    assert client.status(done["job_id"]) == done  # finished before: never touched
    assert [s["key"] for s in standin_log.starts()].count("reg/app:1") == 0


def test_a_stranger_s_raw_message_is_superseded_at_the_worker_and_a_bad_key_rejected_unlaunched(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    start_worker(buildq_env, concurrency=1)
    client = client_for(buildq_env)
    blocker = client.submit({"context": str(context_dir), "tags": ["reg/block:1"],
                             "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")}})  # fmt: skip
    wait_until(lambda: standin_log.starts(), timeout=30)
    app = create_app(settings_from(buildq_env))
    queue = buildq_env["BUILDQ_QUEUE"]
    base = {"context": str(context_dir), "tags": ["reg/raw:1"], "supersede_key": "raw:main"}
    raw_id = new_job_id(time.time() - 1)  # a stranger's message of an older commit, no submit script
    app.send_task("buildq.build", kwargs={"job": {**base, "job_id": raw_id}}, task_id=raw_id, queue=queue,
                  retries=0)  # fmt: skip
    bad = {**base, "job_id": "raw-bad", "tags": ["reg/bad:1"], "supersede_key": "raw main\r\nFLUSHALL"}
    app.send_task("buildq.build", kwargs={"job": bad}, task_id="raw-bad", queue=queue, retries=0)
    app.close()
    newer = client.submit({**base, "tags": ["reg/raw:2"]})
    blocker.cancel()
    # the raw message, older by its id, is found superseded when the worker takes it
    record = client.wait(raw_id, timeout=30)
    assert record["state"] == "cancelled" and record["superseded_by"] == newer.job_id
    assert record["attempts"] == []
    rejected = client.wait("raw-bad", timeout=30)
    assert rejected["error"]["field"] == "supersede_key" and "\n" not in rejected["error"]["message"]
    assert newer.wait(60)["state"] == "succeeded"
    assert [s["key"] for s in standin_log.starts()] == ["reg/block:1", "reg/raw:2"]


def test_the_cli_submits_a_scope_and_refuses_a_bad_one_on_one_line(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    start_worker(buildq_env)
    job = ["submit", "--context", str(context_dir), "--tag", TAG]
    ok = run_cli(buildq_env, *job, "--cache-scope", "Feature/X", "--supersede-key", "team/app:feature-x",
                 "--wait", "--json", "--progress", "quiet")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["cache"]["ref"] == "reg:5000/team/app:buildcache-feature-x"
    for flag, value, field in (
        ("--cache-scope", "???", "cache_scope"),
        ("--supersede-key", "a b*", "supersede_key"),
    ):
        bad = run_cli(buildq_env, *job, flag, value)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.count("\n") == 1 and f"invalid job: {field}: " in bad.stderr
        assert "Traceback" not in bad.stderr
    assert len(standin_log.starts()) == 1


def test_a_build_waiting_for_an_older_exporter_keeps_its_claim_then_exports_after_it(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    env = {**buildq_env, "BUILDQ_CACHE_EXPORT_WAIT_S": "8", "BUILDQ_LEASE_TTL_S": "1"}
    start_worker(env)
    client = client_for(env)
    key = cache_key(parse_job({"context": "/c", "tags": [TAG], "cache_scope": "main"}))
    r = state_redis(env)
    older = {"job": "older-job", "order": 1.0, "until": (time.time() + 3600) * 1000}
    r.hset(export_lease_key(key), mapping=older)
    handle = client.submit({"context": str(context_dir), "tags": [TAG], "cache_scope": "main"})
    wait_until(lambda: client.status(handle.job_id)["state"] == "running", timeout=30)
    # three lease TTLs of waiting: its claim is renewed all along, nothing is launched
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        assert client.store.lease_holder(handle.job_id) is not None
        assert standin_log.starts() == []
        time.sleep(0.1)
    r.hset(export_lease_key(key), "until", 0)  # the older build ended: its release
    record = handle.wait(30)
    assert record["state"] == "succeeded" and record["cache"]["export"] == "exported"
    assert len(record["attempts"]) == 1 and len(standin_log.starts()) == 1


def test_a_branch_s_rebuilds_go_to_the_daemon_that_holds_its_layers(
    standin, context_dir, tmp_path, start_worker
) -> None:
    daemons = tmp_path / "daemons"
    env = simulated_deployment(standin, 14, daemons, f"{DAEMON_A},{DAEMON_B}", BUILDQ_BUILDKIT_MAX_BUILDS="1",
                               BUILDQ_CACHE_DEFAULT_SCOPE="main")  # fmt: skip
    start_worker(env, concurrency=2)
    client = client_for(env)

    def build(scope: str, sleep_s: float = 0.0) -> Any:
        spec = scenario(kind="succeed", sleep_s=sleep_s) if sleep_s else scenario(kind="succeed")
        return client.submit({"context": str(context_dir), "tags": ["reg/app:1"], "cache_scope": scope,
                              "build_args": {"STANDIN_SCENARIO": spec}})  # fmt: skip

    # the two branches' first builds at once: one daemon each (one slot a daemon)
    first = {
        scope: handle.wait(60)
        for scope, handle in (("main", build("main", 2.0)), ("pr-7", build("pr-7", 2.0)))
    }
    assert first["main"]["daemon"] != first["pr-7"]["daemon"]
    for scope in ("main", "pr-7", "main", "pr-7"):
        record = build(scope).wait(60)
        assert (record["routing"], record["daemon"]) == ("affinity", first[scope]["daemon"])
        assert record["steps"]["cached"] == record["steps"]["total"]  # that daemon's local cache
    remembered = {
        k.decode() for k in redis.Redis.from_url(env["BUILDQ_BROKER_URL"]).keys("buildq:affinity:*")
    }
    assert remembered == {f"buildq:affinity:docker.io/reg/app:buildcache-{s}" for s in ("main", "pr-7")}
    # a new branch has nothing remembered; its first build imports main's cache from the registry
    new = build("pr-8").wait(60)
    assert new["routing"] == "least_loaded" and new["cache"]["imported"] is True
    assert new["cache"]["imports"] == ["reg/app:buildcache-pr-8", "reg/app:buildcache-main"]
