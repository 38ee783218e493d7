"""The CLI for people and for programs: ``--version``, ``list`` filters and a validated ``--state``,
RFC 3339 times in every JSON output, ``--json`` on every read command, output that fits a pipe."""

from __future__ import annotations

import json
import re
import socket
import time
import tomllib
from pathlib import Path

import pytest
from typer.main import get_command

import buildq.cli
from buildq.cli.jobs import parse_since
from buildq.store.listing import JobFilter
from tests.harness import client_for
from tests.harness import run_cli as cli

ROOT = Path(__file__).resolve().parent.parent
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LONG_TAG = (
    "127.0.0.1:5000/team-with-a-long-name/service-with-an-even-longer-name/component:2026.12.07-build.1234"
)


def test_version() -> None:
    out = cli({}, "--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.returncode == 0 and out.stdout.strip() == f"buildq {version}"


def test_every_read_command_has_json() -> None:
    commands = get_command(buildq.cli.app).commands  # type: ignore[attr-defined]
    without = {name for name, c in commands.items() if not any("--json" in p.opts for p in c.params)}
    assert without == {"worker", "schema"}  # schema prints JSON Schema and nothing else


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--state", "bogus"), "--state: 'bogus' is not a state"),
        (("--state", "queued", "-s", "Running"), "--state: 'Running' is not a state"),
        (("--since", "yesterday"), "--since: 'yesterday' is neither a duration"),
        (("--since", "2026-12-01T08:00:00"), "has no time zone"),
    ],
)
def test_list_refuses_a_bad_state_or_since_naming_it(args: tuple[str, ...], named: str) -> None:
    out = cli({"BUILDQ_BROKER_URL": "redis://127.0.0.1:1/0"}, "list", *args)  # refused before Redis
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and named in out.stderr and "Traceback" not in out.stderr


def test_parse_since() -> None:
    assert parse_since("90s", 1000.0) == 910.0
    assert parse_since("30m", 10000.0) == 8200.0 and parse_since("1.5h", 10000.0) == 4600.0
    assert parse_since("2d", 200000.0) == 27200.0
    assert parse_since("1970-01-01T00:16:40Z", 0.0) == 1000.0
    assert parse_since("1970-01-01T02:16:40+02:00", 0.0) == 1000.0
    for bad in ("", "5", "5w", "-5m", "now", "1970-01-01"):
        with pytest.raises(ValueError):
            parse_since(bad, 0.0)


def test_job_filter() -> None:
    row = {"tags": ["reg:5000/team-a/app:1", "reg:5000/team-a/app:latest"], "worker": "build-3:4242"}
    assert JobFilter()(row)
    assert JobFilter(repos=("reg:5000/team-a/app",))(row) and JobFilter(repos=("reg:5000/team-a/*",))(row)
    assert not JobFilter(repos=("reg:5000/team-a",))(row)  # a repository, not a prefix
    assert JobFilter(tags=("reg:5000/team-a/app:latest",))(row) and JobFilter(tags=("*:1",))(row)
    assert not JobFilter(tags=("reg:5000/team-a/app:2",))(row)
    assert JobFilter(workers=("build-3",))(row) and JobFilter(workers=("build-3:4242",))(row)
    assert not JobFilter(workers=("build-4",))(row) and not JobFilter(workers=("build",))(row)
    assert not JobFilter(workers=("build-3",))({"tags": [], "worker": None})
    # every kind given must match
    assert not JobFilter(repos=("reg:5000/team-a/app",), workers=("other",))(row)


def _job(context_dir: Path, *tags: str) -> dict:
    return {"context": str(context_dir), "tags": list(tags)}


def _ids(env: dict[str, str], *args: str) -> set[str]:
    """The jobs ``list`` shows (a set: jobs submitted within one millisecond have no order)."""
    out = cli(env, "list", "--json", *args)
    assert out.returncode == 0, out.stderr
    return {row["job_id"] for row in json.loads(out.stdout)["jobs"]}


def test_list_filters_and_rfc3339(buildq_env, start_worker, context_dir) -> None:
    client = client_for(buildq_env)
    a = client.submit(_job(context_dir, "reg:5000/team-a/app:1", "reg:5000/team-a/app:latest")).job_id
    b = client.submit(_job(context_dir, "reg:5000/team-b/web:1")).job_id
    start_worker(buildq_env)
    assert (
        client.wait(a, timeout=60)["state"] == "succeeded"
        and client.wait(b, timeout=60)["state"] == "succeeded"
    )
    c = client.submit(_job(context_dir, "reg:5000/team-a/api:7")).job_id
    assert client.wait(c, timeout=60)["state"] == "succeeded"
    assert _ids(buildq_env) == {c, b, a}
    assert _ids(buildq_env, "--repo", "reg:5000/team-a/app") == {a}
    assert _ids(buildq_env, "--repo", "reg:5000/team-a/*") == {c, a}
    assert _ids(buildq_env, "--repo", "reg:5000/team-b/web", "--repo", "reg:5000/team-a/api") == {c, b}
    assert _ids(buildq_env, "--tag", "reg:5000/team-a/app:latest") == {a}
    assert _ids(buildq_env, "--tag", "*:1") == {b, a}
    host = socket.gethostname()
    assert _ids(buildq_env, "--worker", host) == {c, b, a}
    assert _ids(buildq_env, "--worker", "no-such-host") == set()
    assert _ids(buildq_env, "--since", "1h", "--repo", "reg:5000/team-a/*", "--state", "succeeded") == {c, a}
    assert _ids(buildq_env, "--since", client.status(c)["enqueued_at"]) == {c}  # at or after
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert _ids(buildq_env, "--since", later) == set()
    listed = json.loads(cli(buildq_env, "list", "--json").stdout)["jobs"]
    assert listed[0]["job_id"] == c  # newest first
    (row,) = [r for r in listed if r["job_id"] == a]
    assert RFC3339.match(row["enqueued_at"]) and row["worker"].startswith(f"{host}:")
    assert row["tags"] == ["reg:5000/team-a/app:1", "reg:5000/team-a/app:latest"]
    # the other JSON outputs' times are RFC 3339 too
    status = json.loads(cli(buildq_env, "status", a, "--json").stdout)
    assert all(RFC3339.match(status[k]) for k in ("enqueued_at", "started_at", "finished_at"))
    lines = [json.loads(line) for line in cli(buildq_env, "logs", a, "--json").stdout.splitlines()]
    assert lines and all(RFC3339.match(e["time"]) and e["job_id"] == a for e in lines)
    assert {e["kind"] for e in lines} == {"plain", "mark"} and lines[-1]["line"] == "final: succeeded"


def test_list_and_status_fit_a_pipe(buildq_env, start_worker, context_dir) -> None:
    client = client_for(buildq_env)
    queued = client.submit(_job(context_dir, LONG_TAG)).job_id  # no worker yet: it stays queued
    out = cli(buildq_env, "list")
    assert out.returncode == 0, out.stderr
    header, row, footer = out.stdout.splitlines()
    assert header.split("\t") == ["JOB", "STATE", "PHASE", "AGE", "DURATION", "IMAGE"]
    assert row.split("\t")[:3] == [queued, "queued", "queued"] and row.split("\t")[5] == LONG_TAG
    assert footer.startswith("queued messages: ")
    start_worker(buildq_env)
    record = client.wait(queued, timeout=60)
    digest = record["image"]["digest"]
    listed = cli(buildq_env, "list").stdout.splitlines()[1].split("\t")
    assert listed[1] == "succeeded" and listed[5] == f"{LONG_TAG}@{digest}"  # never wrapped or cut
    status = cli(buildq_env, "status", queued)
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    assert any(line.split() == ["digest", digest] for line in lines)
    assert any(line.split() == ["image", LONG_TAG] for line in lines)
    hanging = client.submit(
        {**_job(context_dir, "reg:5000/x/y:1"), "build_args": {"STANDIN_SCENARIO": '{"kind":"hang"}'}}
    )
    out = cli(buildq_env, "cancel", hanging.job_id, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["job_id"] == hanging.job_id
    assert hanging.wait(timeout=60)["state"] == "cancelled"
