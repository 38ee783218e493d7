"""The worker's log: a line at each build's start and end naming the job, attempt, daemon and
duration, retry lines with their reason, and ``BUILDQ_LOG_FORMAT=json`` (every line one JSON object,
Celery's own lines too)."""

from __future__ import annotations

import json
import logging
import re
import sys

from buildq.celeryapp.jsonlog import JsonLogFormatter
from buildq.celeryapp.task import requeue_text
from tests.conftest import scenario
from tests.harness import client_for, run_cli, wait_until

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PARSE_ERROR = "failed to solve: dockerfile parse error on line 1"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_the_json_formatter_keeps_a_line_a_line_and_names_the_job() -> None:
    formatter = JsonLogFormatter()
    context = {"id": "job-7", "name": "buildq.build", "runtime": 1.23456}
    line = formatter.format(_record("Task %(name)s[%(id)s] succeeded", context, data=context))
    out = json.loads(line)
    assert out["job_id"] == "job-7" and out["task"] == "buildq.build" and out["duration_s"] == 1.235
    assert out["message"] == "Task buildq.build[job-7] succeeded" and RFC3339.match(out["time"])
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        failing = _record("it broke", exc_info=sys.exc_info())
        failing.exc_info = sys.exc_info()
    text = formatter.format(failing)
    assert "\n" not in text and "Traceback" in json.loads(text)["exception"]
    built = json.loads(
        formatter.format(_record("x", job_id="j", attempt=2, daemon="tcp://d:1", phases={"a": 1}))
    )
    assert (built["job_id"], built["attempt"], built["daemon"], built["phases"]) == (
        "j",
        2,
        "tcp://d:1",
        {"a": 1},
    )


def test_a_retry_says_which_attempt_failed_and_why() -> None:
    attempts = [{"number": 1, "outcome": "failed", "reason": "goaway", "error": "received prior goaway\n x"}]
    text = requeue_text("retry_wait", attempts, 0.4321)
    assert (
        text
        == "attempt 1 failed (goaway); retry in 0.43s: received prior goaway x [attempts: #1 failed (goaway)]"
    )
    assert requeue_text("waiting_for_daemon", [], 2.0).startswith("waiting for a BuildKit daemon")


def _lines(worker) -> list[dict]:
    return [json.loads(line) for line in worker.log().splitlines() if line.strip()]


def test_json_worker_log(buildq_env, start_worker, context_dir, tmp_path) -> None:
    env = {**buildq_env, "BUILDQ_LOG_FORMAT": "json"}
    worker = start_worker(env)
    client = client_for(env)
    flaky = scenario(kind="flaky", state_dir=str(tmp_path / "st"), fail_first=1, key="logs", seed=6)  # goaway
    ok = client.submit(
        {"context": str(context_dir), "tags": ["reg/jl:1"], "build_args": {"STANDIN_SCENARIO": flaky}}
    )
    bad_job = scenario(kind="fail", error=PARSE_ERROR)
    bad = client.submit(
        {"context": str(context_dir), "tags": ["reg/jl:2"], "build_args": {"STANDIN_SCENARIO": bad_job}}
    )
    assert ok.wait(timeout=60)["state"] == "succeeded" and bad.wait(timeout=60)["state"] == "failed"
    wait_until(lambda: sum(1 for e in _lines(worker) if e.get("event") == "build_finished") == 2, timeout=10)
    lines = _lines(worker)  # every line of the log is one JSON object (no banner, no plain text)
    assert lines and all(RFC3339.match(e["time"]) and e["level"] and "message" in e for e in lines)
    mine = [e for e in lines if e.get("job_id") == ok.job_id and e.get("event")]
    assert [(e["event"], e.get("attempt")) for e in mine] == [
        ("build_started", 1),
        ("build_requeued", 1),
        ("build_started", 2),
        ("build_finished", 2),
    ]
    started, retry, _, finished = mine
    assert started["daemon"] == buildq_env["BUILDQ_BUILDKIT_HOST"] and started["phase"] == "launch"
    assert retry["phase"] == "retry_wait" and retry["reason"] == "goaway" and retry["delay_s"] >= 0
    assert retry["error"] and retry["duration_s"] >= 0
    assert finished["state"] == "succeeded" and finished["duration_s"] > 0 and finished["phases"]["total"] > 0
    # Celery's own lines name the job too, and its retry line says why
    celery_retry = [e for e in lines if e.get("job_id") == ok.job_id and " retry: " in e["message"]]
    assert len(celery_retry) == 1 and f"({retry['reason']})" in celery_retry[0]["message"]
    assert any(e.get("job_id") == ok.job_id and "received" in e["message"] for e in lines)
    (failed,) = [e for e in lines if e.get("job_id") == bad.job_id and e.get("event") == "build_finished"]
    assert failed["level"] == "WARNING" and failed["reason"] == "dockerfile_syntax"
    assert failed["error_kind"] == "permanent" and failed["state"] == "failed"
    assert not any(e["level"] == "ERROR" for e in lines)


def test_text_worker_log_has_the_same_lines(buildq_env, start_worker, context_dir, tmp_path) -> None:
    worker = start_worker(buildq_env)
    client = client_for(buildq_env)
    flaky = scenario(kind="flaky", state_dir=str(tmp_path / "st"), fail_first=1, key="logs", seed=6)  # goaway
    job = {"context": str(context_dir), "tags": ["reg/tl:1"], "build_args": {"STANDIN_SCENARIO": flaky}}
    handle = client.submit(job)
    assert handle.wait(timeout=60)["state"] == "succeeded"
    wait_until(lambda: f"build {handle.job_id} succeeded" in worker.log(), timeout=10)
    log = worker.log()
    assert f"build {handle.job_id} attempt 1 started on tcp://" in log
    assert re.search(rf"build {handle.job_id} attempt 1 failed \(goaway\); retry in [\d.]+s: ", log)
    assert re.search(rf"Task buildq.build\[{handle.job_id}\] retry: attempt 1 failed \(goaway\)", log)
    assert re.search(rf"build {handle.job_id} succeeded in [\d.]+s \(2 attempts\) on tcp://", log)


def test_a_bad_log_format_is_refused_naming_the_setting() -> None:
    out = run_cli({"BUILDQ_LOG_FORMAT": "xml"}, "list")
    assert out.returncode == 2 and "BUILDQ_LOG_FORMAT" in out.stderr and "Traceback" not in out.stderr
