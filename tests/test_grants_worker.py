"""A real worker refuses what its operator did not grant (secrets, contexts, repositories) before
anything is launched, whoever sends the job; what was granted builds; granted values are masked."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import redis

from buildq.errors import InvalidJobError
from tests.conftest import scenario
from tests.harness import client_for
from tests.harness import run_cli as cli
from tests.test_producers import raw_celery_message

SECRET = "wkr-Cloud-T0ken-9d1f"
OTHER_SECRET = "other-Granted-V4lue-77"


def push_raw(env: dict[str, str], job: dict) -> dict:
    """Send ``job`` as a producer in another language would (LPUSH) and wait for its record."""
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    message = raw_celery_message(job["job_id"], env["BUILDQ_QUEUE"], {"job": job, "enqueued_at": time.time()})
    r.lpush(env["BUILDQ_QUEUE"], message)
    return client_for(env).wait(job["job_id"], timeout=60)


def assert_refused(record: dict, field: str) -> None:
    assert record["state"] == "failed", record
    assert record["error"]["kind"] == "invalid"
    assert record["error"]["field"] == field, record["error"]
    assert record["attempts"] == []


def assert_cli_refused(out, field: str, env: dict[str, str]) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert field in out.stderr
    assert redis.Redis.from_url(env["BUILDQ_BROKER_URL"]).llen(env["BUILDQ_QUEUE"]) == 0  # nothing enqueued


def test_secrets_only_granted_variables(buildq_env, start_worker, context_dir, standin_log) -> None:
    env = {**buildq_env, "BUILDQ_SECRET_ENV": "BUILD_SECRET_*"}
    start_worker({**env, "WORKER_CLOUD_TOKEN": SECRET, "BUILD_SECRET_NPM": OTHER_SECRET})
    base = {"context": str(context_dir), "tags": ["reg/app:1"]}

    leak = {**base, "job_id": "raw-leak", "secrets": [{"id": "x", "env": "WORKER_CLOUD_TOKEN"}]}
    assert_refused(push_raw(env, leak), "secrets[0].env")
    broker = {**base, "job_id": "raw-broker", "secrets": [{"id": "x", "env": "BUILDQ_BROKER_URL"}]}
    assert_refused(push_raw(env, broker), "secrets[0].env")

    out = cli(
        env,
        "submit",
        "--context",
        str(context_dir),
        "--tag",
        "reg/app:1",
        "--secret",
        "id=x,env=WORKER_CLOUD_TOKEN",
    )
    assert_cli_refused(out, "secrets[0].env", env)
    assert "BUILDQ_SECRET_ENV" in out.stderr
    assert standin_log.events() == []

    granted = push_raw(
        env, {**base, "job_id": "raw-granted", "secrets": [{"id": "npm", "env": "BUILD_SECRET_NPM"}]}
    )
    assert granted["state"] == "succeeded", granted
    npm = ("--secret", "id=npm,env=BUILD_SECRET_NPM")
    out = cli(env, "submit", "--context", str(context_dir), "--tag", "reg/app:2", *npm, "--wait", "--json")
    assert out.returncode == 0, out.stderr
    starts = standin_log.starts()
    assert len(starts) == 2
    assert all("id=npm,env=BUILD_SECRET_NPM" in s["argv"] for s in starts)


def test_without_a_grant_no_job_may_use_secrets(buildq_env, start_worker, context_dir, standin_log) -> None:
    """Unset BUILDQ_SECRET_ENV: a producer without the setting enqueues; the worker refuses."""
    start_worker({**buildq_env, "NPM_TOKEN": SECRET})
    job = {"context": str(context_dir), "tags": ["reg/app:1"], "secrets": [{"id": "npm", "env": "NPM_TOKEN"}]}
    record = client_for(buildq_env).submit(job).wait(timeout=60)
    assert_refused(record, "secrets[0].env")
    assert "BUILDQ_SECRET_ENV" in record["error"]["message"]
    assert standin_log.events() == []


def test_granted_values_are_masked_in_records_and_logs(buildq_env, start_worker, context_dir) -> None:
    """buildctl's error line quoting a granted value (the job's own, and one it did not name)."""
    env = {**buildq_env, "BUILDQ_SECRET_ENV": "BUILD_SECRET_*"}
    start_worker({**env, "BUILD_SECRET_NPM": SECRET, "BUILD_SECRET_OTHER": OTHER_SECRET})
    error = f"failed to solve: registry rejected token {SECRET} (also tried {OTHER_SECRET})"
    job = {
        "context": str(context_dir),
        "tags": ["reg/app:1"],
        "secrets": [{"id": "npm", "env": "BUILD_SECRET_NPM"}],
        "build_args": {"STANDIN_SCENARIO": scenario(kind="fail", error=error, after_lines=4)},
    }
    record = client_for(env).submit(job).wait(timeout=60)
    assert record["state"] == "failed" and record["error"]["kind"] == "permanent"
    assert record["error"]["message"] == "failed to solve: registry rejected token *** (also tried ***)"
    assert record["attempts"][0]["error"] == record["error"]["message"]
    everything = json.dumps(record) + cli(env, "logs", record["job_id"]).stdout
    everything += cli(env, "logs", record["job_id"], "--raw").stdout
    assert SECRET not in everything and OTHER_SECRET not in everything


@pytest.fixture
def roots(tmp_path: Path, context_dir: Path) -> dict[str, Path]:
    """A root with a context in it, a symlink in it leading out, and a context outside it."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(context_dir, root / "app")
    (root / "escape").symlink_to(context_dir)  # context_dir (a readable build context) is outside
    return {"root": root, "inside": root / "app", "escape": root / "escape", "outside": context_dir}


def test_contexts_only_under_the_roots(buildq_env, start_worker, roots, standin_log) -> None:
    env = {**buildq_env, "BUILDQ_CONTEXT_ROOTS": str(roots["root"])}
    start_worker(env)
    for name in ("outside", "escape"):
        record = push_raw(env, {"job_id": f"raw-{name}", "context": str(roots[name]), "tags": ["reg/app:1"]})
        assert_refused(record, "context")
        assert "BUILDQ_CONTEXT_ROOTS" in record["error"]["message"]
        assert str(roots["outside"]) not in record["error"]["message"] or name == "outside"
        out = cli(env, "submit", "--context", str(roots[name]), "--tag", "reg/app:1")
        assert_cli_refused(out, "context", env)
    assert standin_log.events() == []

    assert (
        push_raw(env, {"job_id": "raw-in", "context": str(roots["inside"]), "tags": ["reg/app:1"]})["state"]
        == "succeeded"
    )
    out = cli(env, "submit", "--context", str(roots["inside"]), "--tag", "reg/app:2", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    assert len(standin_log.starts()) == 2


def test_the_worker_checks_roots_a_producer_cannot_see(buildq_env, start_worker, roots, standin_log) -> None:
    """Only the worker knows its roots: a producer without the setting enqueues, the worker refuses."""
    start_worker({**buildq_env, "BUILDQ_CONTEXT_ROOTS": str(roots["root"])})
    record = client_for(buildq_env).submit({"context": str(roots["escape"]), "tags": ["reg/app:1"]}).wait(60)
    assert_refused(record, "context")
    assert standin_log.events() == []


def test_tags_and_cache_only_in_allowed_repositories(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    env = {**buildq_env, "BUILDQ_ALLOWED_REPOSITORIES": "registry:5000/team-a/*"}
    start_worker(env)
    base = {"context": str(context_dir), "tags": ["registry:5000/team-a/app:1"]}
    other_tag = {
        **base,
        "job_id": "raw-tag",
        "tags": ["registry:5000/team-a/app:1", "registry:5000/team-b/app:1"],
    }
    assert_refused(push_raw(env, other_tag), "tags[1]")
    other_cache = {**base, "job_id": "raw-cache", "cache_ref": "registry:5000/team-b/app:buildcache"}
    assert_refused(push_raw(env, other_cache), "cache_ref")

    out = cli(env, "submit", "--context", str(context_dir), "--tag", "registry:5000/team-b/app:1")
    assert_cli_refused(out, "tags[0]", env)
    other = ("--cache-ref", "registry:5000/team-b/c:1")
    out = cli(env, "submit", "--context", str(context_dir), "--tag", "registry:5000/team-a/app:1", *other)
    assert_cli_refused(out, "cache_ref", env)
    with pytest.raises(InvalidJobError) as info:
        client_for(env).submit({**base, "tags": ["docker.io/team-a/app:1"]})
    assert info.value.field == "tags[0]"
    assert standin_log.events() == []

    granted = push_raw(env, {**base, "job_id": "raw-ok", "tags": ["registry:5000/team-a/sub/app:1"]})
    assert (
        granted["state"] == "succeeded"
        and granted["cache"]["ref"] == "registry:5000/team-a/sub/app:buildcache"
    )
    out = cli(
        env,
        "submit",
        "--context",
        str(context_dir),
        "--tag",
        "registry:5000/team-a/app:2",
        "--wait",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert len(standin_log.starts()) == 2
