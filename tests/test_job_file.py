"""``buildq submit --job-file``: a JSON job from a file or stdin, strict, flags overriding it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from buildq.cli.submit import merge_job, read_job_file
from buildq.errors import InvalidJobError
from tests.harness import client_for
from tests.harness import run_cli as cli


def test_merge_flags_override_fields() -> None:
    base = {"context": "/a", "tags": ["r/a:1"], "build_args": {"A": "1"}, "push": True}
    merged = merge_job(base, {"tags": ["r/b:2"], "push": None, "context": None, "build_args": {"B": "2"}})
    assert merged == {"context": "/a", "tags": ["r/b:2"], "build_args": {"B": "2"}, "push": True}


def test_bad_job_files_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{nope")
    for name, words in [
        ("list.json", "JSON object"),
        ("bad.json", "not JSON"),
        ("missing.json", "cannot read"),
    ]:
        with pytest.raises(InvalidJobError) as err:
            read_job_file(str(tmp_path / name))
        assert err.value.field == "job-file" and words in err.value.message


def test_unknown_field_in_job_file_is_named_and_nothing_enqueued(buildq_env, context_dir, tmp_path) -> None:
    job = {"context": str(context_dir), "tags": ["127.0.0.1:5000/d/f:1"], "tagz": ["oops"]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = cli(buildq_env, "submit", "--job-file", str(tmp_path / "job.json"))
    assert out.returncode == 2
    assert "unknown field 'tagz'" in out.stderr
    assert client_for(buildq_env).store.redis.keys("buildq:job:*") == []


def test_job_from_stdin_with_flag_overrides(buildq_env, start_worker, context_dir, standin_log) -> None:
    start_worker(buildq_env)
    job = {
        "context": str(context_dir),
        "tags": ["127.0.0.1:5000/d/file:1"],
        "build_args": {"FROM_FILE": "1"},
        "labels": {"team": "a"},
    }
    out = cli(
        buildq_env, "submit", "--job-file", "-", "--tag", "127.0.0.1:5000/d/flag:2", "--job-id", "jf-1",
        "--wait", "--json", stdin=json.dumps(job),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["job_id"] == "jf-1" and record["image"]["names"] == ["127.0.0.1:5000/d/flag:2"]
    (start,) = standin_log.starts()
    assert "build-arg:FROM_FILE=1" in start["argv"] and "label:team=a" in start["argv"]


def test_job_file_without_context_says_so(buildq_env, tmp_path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"tags": ["127.0.0.1:5000/d/f:1"]}))
    out = cli(buildq_env, "submit", "--job-file", str(tmp_path / "job.json"))
    assert out.returncode == 2 and "context" in out.stderr
