"""One documented record shape in every state: real outputs (CLI and Python client) of a real worker
validated against ``buildq schema --record``; the examples in docs/jobs.md too; the hash → record view."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from buildq.contract.record import job_status, public_record, record_schema
from tests.conftest import scenario
from tests.harness import client_for, wait_until
from tests.harness import run_cli as cli

ROOT = Path(__file__).resolve().parent.parent
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COMMON = {"job_id", "retry_of", "state", "phase", "attempt", "worker", "daemon", "enqueued_at", "started_at"}
FINISHED = {
    "finished_at", "duration_s", "image", "cache", "attempts", "error", "phases", "steps", "slowest_steps",
    "routing", "explain", "superseded_by",
}  # fmt: skip


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = record_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def check(validator: Any, record: dict[str, Any], state: str) -> dict[str, Any]:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(record)]
    assert errors == [], (state, record)
    assert record["state"] == state
    finished = state in ("succeeded", "failed", "cancelled")
    assert set(record) == (COMMON | FINISHED if finished else COMMON), record
    return record


def status_json(env: dict[str, str], job_id: str) -> dict[str, Any]:
    out = cli(env, "status", job_id, "--json")
    assert out.returncode in (0, 1), out.stderr
    return dict(json.loads(out.stdout))


def test_every_state_has_the_documented_shape(buildq_env, start_worker, context_dir, validator) -> None:
    env = {**buildq_env, "BQ_SET_ON_WORKER": "value-of-a-secret"}
    client = client_for(env)

    def job(tag: str, **extra: Any) -> dict[str, Any]:
        return {"context": str(context_dir), "tags": [tag], **extra}

    assert cli(env, "schema", "--record").stdout.strip() == json.dumps(record_schema(), indent=2)
    unknown = check(validator, status_json(env, "never-seen"), "unknown")
    assert {k for k, v in unknown.items() if v is not None} == {"job_id", "state"}
    assert check(validator, client.status("never-seen"), "unknown") == unknown

    sleepy = scenario(kind="succeed", sleep_s=3)
    slow = client.submit(job("reg/shape:slow", build_args={"STANDIN_SCENARIO": sleepy}))
    hang = client.submit(job("reg/shape:hang", build_args={"STANDIN_SCENARIO": scenario(kind="hang")}))
    queued = check(validator, status_json(env, slow.job_id), "queued")  # no worker yet
    assert queued["phase"] == "queued" and queued["attempt"] is None and ISO.match(queued["enqueued_at"])
    assert check(validator, client.status(slow.job_id), "queued") == queued

    start_worker(env, concurrency=2)
    running = wait_until(lambda: (s := status_json(env, hang.job_id))["state"] == "running" and s, timeout=30)
    check(validator, running, "running")
    assert running["attempt"] == 1 and running["worker"] and running["daemon"] == "tcp://127.0.0.1:1234"
    assert ISO.match(running["started_at"]) and running["phase"] in ("launch", "context", "build")
    check(validator, client.cancel(hang.job_id), "running")
    check(validator, hang.wait(timeout=60), "cancelled")
    check(validator, status_json(env, hang.job_id), "cancelled")

    done = check(validator, slow.wait(timeout=60), "succeeded")
    assert done["phase"] == "done" and done["attempt"] == 1 and done["daemon"] == "tcp://127.0.0.1:1234"
    assert re.match(r"^.+:\d+$", done["worker"])  # host:pid of the pool process
    assert check(validator, status_json(env, slow.job_id), "succeeded") == done

    bad = client.submit(job("reg/shape:bad", build_args={"STANDIN_SCENARIO": scenario(kind="fail")}))
    failed = check(validator, bad.wait(timeout=60), "failed")
    assert failed["error"]["kind"] == "permanent"
    check(validator, status_json(env, bad.job_id), "failed")

    # valid for the client, rejected by the worker (the variable is not set there): enqueued, so
    # the CLI exits 1 with the record, not 2
    out = cli(
        env, "submit", "--context", str(context_dir), "--tag", "reg/shape:rejected",
        "--secret", "id=s,env=BQ_UNSET_ON_WORKER", "--wait", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    rejected = check(validator, json.loads(out.stdout), "failed")
    assert rejected["error"]["kind"] == "invalid" and rejected["error"]["field"].startswith("secrets")
    assert rejected["attempt"] is None and rejected["worker"] and rejected["image"] is None


def documented_record_examples() -> list[dict[str, Any]]:
    text = (ROOT / "docs" / "jobs.md").read_text()
    section = text.split("\n## Result record\n", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


def test_the_documented_examples_match_the_schema(validator) -> None:
    examples = documented_record_examples()
    assert {e["state"] for e in examples} >= {"succeeded", "running"}
    for example in examples:
        check(validator, example, example["state"])


# ---- the view over stored data (pure) ---------------------------------------------------------

RAW_QUEUED = {
    "state": "queued", "enqueued_at": "1795843348.49", "queue": "builds",
    "msg": '{"body": "eyJqb2IiOiB7fX0="}', "tag": "5d1c", "job": '{"context": "/srv"}',
}  # fmt: skip
RAW_RUNNING = {
    "state": "running", "enqueued_at": "1795843348.49", "queue": "builds", "gen": "1", "holder": "host:42",
    "domain": "host", "delivery": "5d1c", "attempts": "[]", "window_start": "1795843348.49",
    "running": '{"started_at": 1795843348.6, "daemon": "tcp://bk:1234"}', "avoid": "tcp://bk:9",
    "attempt": "1", "worker": "host:42", "daemon": "tcp://bk:1234", "started_at": "1795843348.6",
    "phase": "build",
}  # fmt: skip


def test_the_job_hash_becomes_the_documented_shape(validator) -> None:
    queued = check(validator, job_status("j", RAW_QUEUED, None), "queued")
    assert queued["enqueued_at"] == "2026-11-28T05:22:28.490Z" and queued["phase"] == "queued"
    running = check(validator, job_status("j", RAW_RUNNING, None), "running")
    assert running["attempt"] == 1 and running["started_at"] == "2026-11-28T05:22:28.600Z"
    # between attempts: queued again, with the last attempt's number, worker and daemon
    between = {**RAW_RUNNING, "state": "queued", "phase": "retry_wait"}
    waiting = check(validator, job_status("j", between, None), "queued")
    assert (waiting["attempt"], waiting["phase"]) == (1, "retry_wait")
    check(validator, job_status("j", {}, None), "unknown")


def test_a_record_of_an_older_worker_is_brought_to_the_shape(validator) -> None:
    attempt = {
        "number": 1, "daemon": "tcp://bk:1234", "started_at": "2026-11-28T05:22:28.600Z",
        "finished_at": "2026-11-28T05:22:29.000Z", "duration_s": 0.4, "outcome": "failed", "exit_code": 1,
        "reason": "run_step", "error": "failed to solve: x", "window_end": 1795843349.1,
        "phases": {k: 0.0 for k in ("queued", "launch", "context", "cache_import", "build", "export_image",
                                    "push", "cache_export", "finalize", "other", "total")},
    }  # fmt: skip
    old = {
        "job_id": "j", "state": "failed", "enqueued_at": "2026-11-28T05:22:28.490Z",
        "started_at": attempt["started_at"], "finished_at": "2026-11-28T05:22:29.100Z", "duration_s": 0.5,
        "image": {"names": ["reg/a:1"], "digest": None, "pushed": False},
        "cache": {"ref": "reg/a:buildcache", "imported": False, "import_error": None, "exported": False,
                  "error": None},
        "attempts": [attempt], "error": {"kind": "permanent", "reason": "run_step", "message": "x"},
        "phases": attempt["phases"], "steps": None, "slowest_steps": [],
    }  # fmt: skip
    new = check(validator, public_record(old), "failed")
    assert "window_end" not in new["attempts"][0] and new["daemon"] == "tcp://bk:1234"
    assert (new["phase"], new["attempt"]) == ("done", 1)
