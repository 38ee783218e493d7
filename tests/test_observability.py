"""Per-phase timing published where operators look: result record, Celery events/state, Prometheus."""

from __future__ import annotations

import threading
import time
import urllib.request

import redis
from celery.result import AsyncResult

from buildq.buildkit.phases import ALL_KEYS, PHASES
from buildq.celeryapp.app import create_app
from tests.conftest import scenario
from tests.harness import client_for, free_port, settings_from, wait_until


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def assert_sum_rule(phases: dict[str, float]) -> None:
    assert set(phases) == set(ALL_KEYS)
    assert all(v >= 0 for v in phases.values())
    assert round(sum(phases[p] for p in PHASES), 3) == phases["total"]


def test_record_phases_steps_and_retried_attempts(buildq_env, start_worker, context_dir, tmp_path):
    start_worker(buildq_env)
    client = client_for(buildq_env)
    # first attempt fails with a transient text, the second replays the capture at its real pace
    flaky = scenario(kind="flaky", state_dir=str(tmp_path / "st"), fail_first=1, pace=1.0)
    record = client.submit(
        {"context": str(context_dir), "tags": ["reg/phases:1"], "build_args": {"STANDIN_SCENARIO": flaky}}
    ).wait(timeout=60)
    assert record["state"] == "succeeded"
    assert_sum_rule(record["phases"])
    first, second = record["attempts"]
    assert first["outcome"] == "failed" and second["outcome"] == "succeeded"
    assert_sum_rule(first["phases"])
    assert_sum_rule(second["phases"])
    for name in ALL_KEYS:  # the record's phases are the attempts' phases added up
        assert abs(record["phases"][name] - (first["phases"][name] + second["phases"][name])) < 0.0015
    # the replayed capture took ~0.6 s of which the context upload (8.6 MB) and the export are real work
    assert second["phases"]["context"] > 0.05
    assert second["phases"]["export_image"] + second["phases"]["push"] > 0.1
    assert record["phases"]["queued"] >= first["phases"]["queued"]  # the backoff wait counts as queued
    assert record["steps"] == {"total": 2, "cached": 0, "executed": 2, "cache_hit_ratio": 0.0}
    assert record["slowest_steps"][0]["name"] == "[2/2] COPY app/ /app/"


def test_phase_events_and_current_phase_while_running(buildq_env, start_worker, context_dir):
    """With BUILDQ_TASK_RESULTS (producers that poll AsyncResult), Celery's result backend shows the
    running build as BUILDING; the phase events go out either way."""
    buildq_env = {**buildq_env, "BUILDQ_TASK_RESULTS": "true"}
    start_worker(buildq_env)
    client = client_for(buildq_env)
    app = create_app(settings_from(buildq_env))  # Celery's view: events and the result backend
    events: list[dict] = []
    ready = threading.Event()
    receivers: list = []

    def listen() -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"buildq-phase": events.append, "*": lambda e: None})
            receivers.append(recv)
            ready.set()
            recv.capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(10)
    time.sleep(0.5)  # let the receiver's queue bind before the build starts
    slow = scenario(kind="succeed", sleep_s=2.0)
    handle = client.submit(
        {"context": str(context_dir), "tags": ["reg/events:1"], "build_args": {"STANDIN_SCENARIO": slow}}
    )
    # while it runs, the result backend and `buildq status` show the current phase
    result = AsyncResult(handle.job_id, app=app)
    wait_until(lambda: result.state == "BUILDING", timeout=20)
    info = result.info
    assert info["job_id"] == handle.job_id and info["attempt"] == 1
    assert info["phase"] in ("launch", "context", "cache_import", "build")
    assert client.status(handle.job_id)["state"] == "running"
    record = handle.wait(timeout=60)
    wait_until(lambda: any(e["phase"] == "finalize" for e in events), timeout=25)  # batched: up to 10 s
    receivers[0].should_stop = True
    mine = [e for e in events if e["job_id"] == handle.job_id]
    phases = [e["phase"] for e in mine]
    assert phases[0] == "queued" and phases[1] == "launch" and phases[-1] == "finalize"
    assert {"context", "build", "export_image", "push", "cache_export"} <= set(phases)
    assert all(e["uuid"] == handle.job_id and e["seconds"] >= 0 for e in mine)
    # the step that slept 2 s shows in both the live events and the record
    assert max(e["seconds"] for e in mine) >= 1.5
    assert record["phases"]["total"] >= 2.0
    assert result.state == "SUCCESS"


def test_without_task_results_celerys_backend_is_never_written(buildq_env, start_worker, context_dir):
    """buildq's record is the outcome: by default a build writes nothing to Celery's result backend
    (and costs no command there), and its running state and phase are in `buildq status`."""
    start_worker({**buildq_env, "BUILDQ_LEASE_TTL_S": "1.5"})
    client = client_for(buildq_env)
    backend = redis.Redis.from_url(buildq_env["BUILDQ_RESULT_BACKEND"])
    slow = scenario(kind="succeed", sleep_s=1.5)
    handle = client.submit(
        {"context": str(context_dir), "tags": ["reg/nores:1"], "build_args": {"STANDIN_SCENARIO": slow}}
    )
    wait_until(lambda: client.status(handle.job_id)["state"] == "running", timeout=20)
    # the renewal (every lease / 3) writes the phase the build is in
    wait_until(lambda: client.status(handle.job_id)["phase"] not in (None, "launch"), timeout=10)
    assert handle.wait(timeout=60)["state"] == "succeeded"
    assert backend.dbsize() == 0


def test_prometheus_metrics_after_real_builds(buildq_env, start_worker, context_dir, tmp_path):
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom")}
    start_worker(env, concurrency=2)
    client = client_for(env)
    ok = [client.submit({"context": str(context_dir), "tags": [f"reg/m{i}:1"]}) for i in range(3)]
    bad = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/mbad:1"],
            "build_args": {
                "STANDIN_SCENARIO": scenario(
                    kind="fail", error="failed to solve: dockerfile parse error on line 1"
                )
            },
        }
    )
    flaky = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/mflaky:1"],
            "build_args": {
                "STANDIN_SCENARIO": scenario(kind="flaky", state_dir=str(tmp_path / "st"), fail_first=1)
            },
        }
    )
    for handle in [*ok, bad, flaky]:
        handle.wait(timeout=60)
    # the metrics of a build are written just after its record (a hook): wait for the last one
    done = 'buildq_build_phase_seconds_count{outcome="failed",phase="total"}'
    samples = wait_until(
        lambda: (
            (s := scrape(port)).get(done) == 1.0
            and s.get('buildq_build_phase_seconds_count{outcome="succeeded",phase="total"}') == 4.0
            and s
        ),
        timeout=10,
    )
    assert samples['buildq_builds_total{outcome="succeeded"}'] == 4.0
    assert samples['buildq_builds_total{outcome="failed"}'] == 1.0
    assert samples['buildq_build_attempts_total{outcome="failed",reason="dockerfile_syntax"}'] == 1.0
    transient = [
        k
        for k in samples
        if k.startswith('buildq_build_attempts_total{outcome="failed"') and "dockerfile_syntax" not in k
    ]
    assert sum(samples[k] for k in transient) == 1.0
    assert samples['buildq_build_attempts_total{outcome="succeeded",reason="none"}'] == 4.0
    # the phase histogram by the build's outcome
    assert samples['buildq_build_phase_seconds_count{outcome="succeeded",phase="total"}'] == 4.0
    assert samples['buildq_build_phase_seconds_count{outcome="failed",phase="total"}'] == 1.0
    assert samples['buildq_build_phase_seconds_bucket{le="3600.0",outcome="succeeded",phase="build"}'] == 4.0
    assert samples['buildq_build_steps_total{kind="executed"}'] == 8.0
    assert samples["buildq_builds_in_progress"] == 0.0
