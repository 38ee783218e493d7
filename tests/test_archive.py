"""Finished jobs leave Redis: logs and records archived to BUILDQ_ARCHIVE_DIR, read back transparently
(a real worker with the archive set, real Redis; the CLI as a user runs it)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import redis

from buildq.store.archive import Archive, ArchiveError, GzipLines
from buildq.store.keys import job_key, log_key
from buildq.store.logs import decode_lines
from tests.conftest import FIXTURES, scenario
from tests.harness import client_for, wait_until
from tests.harness import run_cli as cli
from tests.test_build_logs import step_lines


@pytest.fixture
def archive_env(buildq_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**buildq_env, "BUILDQ_ARCHIVE_DIR": str(tmp_path / "archive"), "BUILDQ_LOG_ARCHIVED_TTL_S": "2",
            "BUILDQ_ARCHIVED_RECORD_TTL_S": "120"}  # fmt: skip


def job(context_dir: Path, tag: str, **scen: object) -> dict:
    return {"context": str(context_dir), "tags": [tag],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", **scen)}}  # fmt: skip


def test_a_short_builds_log_goes_to_the_archive_only_and_reads_back_whole(
    archive_env, start_worker, context_dir
) -> None:
    start_worker(archive_env)
    client = client_for(archive_env)
    r = redis.Redis.from_url(archive_env["BUILDQ_BROKER_URL"])
    handle = client.submit(job(context_dir, "reg/arch:1"))
    record = handle.wait(timeout=60)
    assert record["state"] == "succeeded"
    # ended before its first flush: not one line went to Redis
    assert r.exists(log_key(handle.job_id)) == 0
    folder = Archive(archive_env["BUILDQ_ARCHIVE_DIR"]).job_dir(handle.job_id)
    assert sorted(p.name for p in folder.iterdir()) == ["attempt-1.log.gz", "record.json"]
    assert json.loads((folder / "record.json").read_text())["job_id"] == handle.job_id
    lines = decode_lines(gzip.decompress((folder / "attempt-1.log.gz").read_bytes()).decode())
    assert lines[0][0] == "mark" and lines[-1] == ("end", "final: succeeded")
    out = cli(archive_env, "logs", handle.job_id)
    assert out.returncode == 0, out.stderr
    genuine = (FIXTURES / "builds" / "ctx_oci_plain_cold.stderr").read_text().splitlines()
    assert step_lines(out.stdout.splitlines()) == step_lines(genuine)
    assert out.stdout.rstrip().endswith("--- final: succeeded ---")


def test_a_follower_sees_the_end_the_archive_holds(archive_env, start_worker, context_dir) -> None:
    start_worker(archive_env)
    standin = "STANDIN_SCENARIO=" + scenario(kind="succeed")
    out = cli(archive_env, "submit", "--wait", "--progress", "plain", "--context", str(context_dir),
              "--tag", "reg/arch:2", "--build-arg", standin)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "#1 [internal] load build definition from Dockerfile" in out.stderr
    assert "--- attempt 1: final: succeeded ---" in out.stderr


def test_a_long_builds_stream_leaves_redis_soon_after_the_end(archive_env, start_worker, context_dir) -> None:
    start_worker(archive_env)
    client = client_for(archive_env)
    r = redis.Redis.from_url(archive_env["BUILDQ_BROKER_URL"])
    handle = client.submit(job(context_dir, "reg/arch:3", sleep_s=3.0))  # flushed while it runs
    wait_until(lambda: r.exists(log_key(handle.job_id)), timeout=30)
    assert r.ttl(log_key(handle.job_id)) > 3600  # while it runs: BUILDQ_LOG_STREAM_TTL_S
    assert handle.wait(timeout=60)["state"] == "succeeded"
    assert 0 < r.ttl(log_key(handle.job_id)) <= 2  # then BUILDQ_LOG_ARCHIVED_TTL_S
    wait_until(lambda: not r.exists(log_key(handle.job_id)), timeout=10)
    shown = client.logs(handle.job_id)
    assert shown[-1].line == "final: succeeded" and any(e.line.startswith("#1 ") for e in shown)


def test_a_record_gone_from_redis_is_read_from_the_archive(archive_env, start_worker, context_dir) -> None:
    start_worker(archive_env)
    client = client_for(archive_env)
    handle = client.submit(job(context_dir, "reg/arch:4"))
    record = handle.wait(timeout=60)
    r = redis.Redis.from_url(archive_env["BUILDQ_BROKER_URL"])
    assert 0 < r.ttl(job_key(handle.job_id)) <= 120  # Redis keeps the archived record a short while
    r.delete(job_key(handle.job_id))  # its TTL passed
    assert client.status(handle.job_id) == record
    out = cli(archive_env, "status", handle.job_id, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "succeeded"


def test_an_archive_that_cannot_be_written_leaves_the_log_in_redis(
    archive_env, start_worker, context_dir, tmp_path
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the archive should be")
    env = {**archive_env, "BUILDQ_ARCHIVE_DIR": str(blocked)}
    start_worker(env)
    client = client_for(env)
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    handle = client.submit(job(context_dir, "reg/arch:5"))
    assert handle.wait(timeout=60)["state"] == "succeeded"  # the build is not held up
    assert r.xlen(log_key(handle.job_id)) >= 1 and r.ttl(log_key(handle.job_id)) > 3600
    wait_until(lambda: r.ttl(job_key(handle.job_id)) > 3600, timeout=10)  # the record too: not archived
    assert client.logs(handle.job_id)[-1].line == "final: succeeded"


def test_paths_are_made_only_from_valid_job_ids_and_never_through_a_symlink(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "a")
    for bad in ("../x", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(ArchiveError, match="job_id"):
            archive.job_dir(bad)
    gz = GzipLines()
    gz.add([("raw", "line 1"), ("mark", "a mark")])
    gz.add([("end", "final: failed")])
    archive.write_attempt("ok-1", 1, gz.finish())
    assert archive.attempts("ok-1") == [1]
    expected = [("raw", "line 1"), ("mark", "a mark"), ("end", "final: failed")]
    assert archive.read_attempt("ok-1", 1) == expected
    target = tmp_path / "elsewhere"
    target.mkdir()
    folder = archive.job_dir("sym-1")
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, folder)
    with pytest.raises(ArchiveError, match="symlink"):
        archive.write_record("sym-1", "{}")
    assert list(target.iterdir()) == []
