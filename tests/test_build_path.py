"""A queued job becomes a pushed image through a real Celery worker (local launcher + stand-in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from buildq.celeryapp.app import create_app
from buildq.errors import InvalidJobError
from tests.conftest import scenario
from tests.harness import client_for, settings_from
from tests.harness import run_cli as cli


def test_python_api_build_succeeds(buildq_env, start_worker, context_dir, standin_log) -> None:
    start_worker(buildq_env)
    client = client_for(buildq_env)
    handle = client.submit({"context": str(context_dir), "tags": ["127.0.0.1:5000/demo/app:1"]})
    record = handle.wait(timeout=60)
    assert record["state"] == "succeeded", record
    assert record["job_id"] == handle.job_id
    assert record["image"]["names"] == ["127.0.0.1:5000/demo/app:1"]
    assert record["image"]["digest"].startswith("sha256:") and len(record["image"]["digest"]) == 71
    assert record["cache"]["ref"] == "127.0.0.1:5000/demo/app:buildcache"
    assert record["error"] is None
    assert [a["outcome"] for a in record["attempts"]] == ["succeeded"]
    assert record["duration_s"] >= 0
    # the stand-in saw the genuine flags, with the daemon address from BUILDKIT_HOST
    (start,) = standin_log.starts()
    argv = start["argv"][1:]
    assert argv[:3] == ["build", "--frontend", "dockerfile.v0"]
    assert f"context={context_dir}" in argv
    export = argv[argv.index("--export-cache") + 1]
    assert "oci-mediatypes=true" in export and "image-manifest=true" in export
    assert handle.status()["state"] == "succeeded"
    # the lease and the daemon slot went back in the same transaction that stored the result
    r = client.store.redis
    assert r.exists(f"buildq:lease:{handle.job_id}") == 0
    assert r.keys("buildq:slots:*") == []  # the set goes when its last holder leaves


def test_cli_submit_wait_json_and_status(buildq_env, start_worker, context_dir) -> None:
    start_worker(buildq_env)
    done = cli(
        buildq_env,
        "submit",
        "--context",
        str(context_dir),
        "--tag",
        "127.0.0.1:5000/demo/cli:1",
        "--tag",
        "127.0.0.1:5000/demo/cli:latest",
        "--build-arg",
        "A=1",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "succeeded"
    assert record["image"]["names"] == ["127.0.0.1:5000/demo/cli:1", "127.0.0.1:5000/demo/cli:latest"]
    status = cli(buildq_env, "status", record["job_id"], "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["image"]["digest"] == record["image"]["digest"]
    human = cli(buildq_env, "status", record["job_id"])
    assert "succeeded" in human.stdout and record["image"]["digest"] in human.stdout


def test_cli_submit_without_wait_prints_job_id(buildq_env, start_worker, context_dir) -> None:
    start_worker(buildq_env)
    out = cli(buildq_env, "submit", "--context", str(context_dir), "--tag", "reg/a:1", "--job-id", "my-job.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "my-job.1"
    assert client_for(buildq_env).wait("my-job.1", timeout=60)["state"] == "succeeded"


def test_failed_build_reports_buildctl_error_line(buildq_env, start_worker, context_dir) -> None:
    start_worker(buildq_env)
    text = (
        "failed to solve: dockerfile parse error on line 3: unknown instruction: FROMM (did you mean FROM?)"
    )
    sc = scenario(kind="fail", error=text, after_lines=4)
    out = cli(
        buildq_env,
        "submit",
        "--context",
        str(context_dir),
        "--tag",
        "reg/a:1",
        "--build-arg",
        f"STANDIN_SCENARIO={sc}",
        "--wait",
        "--json",
    )
    assert out.returncode == 1
    record = json.loads(out.stdout)
    assert record["state"] == "failed"
    assert record["error"]["kind"] == "permanent"
    assert record["error"]["message"] == text
    assert record["image"]["digest"] is None


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--tag", "Bad/UPPER"], "tags"),
        (["--tag", "reg/a:1,push=false"], "tags"),
        (["--tag", "reg/a:1", "--build-arg", "A,B=1"], "build_args"),
        (["--tag", "reg/a:1", "--cache-ref", "reg/a:c,mode=min"], "cache_ref"),
        (["--tag", "reg/a:1", "--cache-ref", "reg/a:c=x"], "cache_ref"),
    ],
)
def test_cli_rejects_bad_input_before_launch(buildq_env, context_dir, standin_log, args, field) -> None:
    out = cli(buildq_env, "submit", "--context", str(context_dir), *args)
    assert out.returncode == 2
    assert field in out.stderr
    assert standin_log.events() == []


def test_cli_rejects_missing_context(buildq_env, tmp_path) -> None:
    out = cli(buildq_env, "submit", "--context", str(tmp_path / "nope"), "--tag", "reg/a:1")
    assert out.returncode == 2
    assert "context" in out.stderr


def test_api_rejects_unknown_field_and_newline(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)
    with pytest.raises(InvalidJobError) as info:
        client.submit({"context": str(context_dir), "tags": ["reg/a:1"], "pushh": True})
    assert info.value.field == "pushh"
    with pytest.raises(InvalidJobError) as info:
        client.submit({"context": str(context_dir), "tags": ["reg/a:1"], "build_args": {"A": "x\ny"}})
    assert info.value.field == "build_args"


def test_worker_rejects_context_missing_on_worker_without_launching(
    buildq_env, start_worker, tmp_path: Path, standin_log
) -> None:
    start_worker(buildq_env)
    client = client_for(buildq_env)
    handle = client.submit({"context": str(tmp_path / "gone"), "tags": ["reg/a:1"]})
    record = handle.wait(timeout=60)
    assert record["state"] == "failed"
    assert record["error"]["kind"] == "invalid"
    assert record["error"]["field"] == "context"
    assert standin_log.events() == []


def test_raw_message_with_bad_field_is_rejected_by_worker(buildq_env, start_worker, standin_log) -> None:
    """A producer that skips validation (another language) still cannot launch a bad job."""
    start_worker(buildq_env)
    client = client_for(buildq_env)
    app = create_app(settings_from(buildq_env))  # a plain Celery producer: no submit, no job hash
    app.send_task(
        "buildq.build",
        kwargs={"job": {"job_id": "raw-1", "context": "/x", "tags": ["a:1\n"]}},
        task_id="raw-1",
        queue=buildq_env["BUILDQ_QUEUE"],
    )
    app.close()
    record = client.wait("raw-1", timeout=60)
    assert record["state"] == "failed"
    assert record["error"]["field"].startswith("tags")
    assert standin_log.events() == []


def test_schema_command_prints_json_schema(buildq_env) -> None:
    out = cli(buildq_env, "schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert set(schema["required"]) == {"context", "tags"}
    assert schema["properties"]["cache_mode"]["enum"] == ["max", "min"]


def test_invalid_settings_name_the_variable(buildq_env) -> None:
    out = cli({**buildq_env, "BUILDQ_LAUNCHER": "k8s"}, "status", "x")
    assert out.returncode == 2
    assert "BUILDQ_LAUNCHER" in out.stderr
    out = cli({**buildq_env, "BUILDQ_NOT_A_SETTING": "1"}, "status", "x")
    assert out.returncode == 2
    assert "BUILDQ_NOT_A_SETTING" in out.stderr
