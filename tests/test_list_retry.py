"""``buildq list`` (recent jobs, queue depths), ``buildq retry`` (a new job naming the old one),
``buildq cancel`` of a finished job, and the live progress pieces of ``submit --wait``."""

from __future__ import annotations

import json

import jsonschema

from buildq.cli.views import StepCounter, ago, list_lines, progress_line
from buildq.contract.record import record_schema
from buildq.store.listing import job_row
from tests.conftest import scenario
from tests.harness import client_for
from tests.harness import run_cli as cli

TAG = "127.0.0.1:5000/demo/list:1"


def test_job_row_from_hash_and_record() -> None:
    body = '{"job_id":"a","tags":["r/a:1","r/a:latest"]}'
    pending = job_row(
        "a", {"state": "queued", "phase": None, "enqueued_at": "100.5", "retry_of": None, "job": body}, None
    )
    assert pending == {
        "job_id": "a", "state": "queued", "phase": "queued", "enqueued_at": "1970-01-01T00:01:40.500Z",
        "duration_s": None, "image": "r/a:1", "tags": ["r/a:1", "r/a:latest"], "worker": None, "daemon": None,
        "retry_of": None,
    }  # fmt: skip
    record = {"state": "succeeded", "phase": "done", "duration_s": 1.5, "retry_of": "old", "worker": "h:1",
              "image": {"names": ["r/a:1"], "digest": "sha256:ab"}}  # fmt: skip
    row = job_row("b", {"state": "succeeded", "enqueued_at": "100"}, record)
    assert row is not None and row["image"] == "r/a:1@sha256:ab" and row["retry_of"] == "old"
    assert row["tags"] == ["r/a:1"] and row["worker"] == "h:1"
    assert job_row("gone", {"state": None}, None) is None


def test_list_lines_and_age() -> None:
    assert [ago(5), ago(125), ago(7300), ago(200000), ago(None)] == ["5s", "2m", "2h", "2d", "-"]
    rows = [{"job_id": "j", "state": "failed", "phase": "done", "enqueued_at": "1970-01-01T00:00:40.000Z",
             "duration_s": 2.25, "image": None, "retry_of": "i"}]  # fmt: skip
    assert list_lines(rows, {}, 100.0) == [["j", "failed", "done", "1m", "2.2s", "-  (retry of i)"]]


def test_step_counter_and_progress_line() -> None:
    counter = StepCounter()
    assert counter.counts() is None
    for line in ["#1 [internal] load build definition from Dockerfile", "#1 DONE 0.0s",
                 "#5 [1/3] COPY hello.txt /hello.txt", "#5 CACHED",
                 "#6 [builder 2/3] RUN make", "#6 0.2 compiling", "#6 DONE 1.0s",
                 "#7 [3/3] COPY app/ /app/"]:  # fmt: skip
        counter.feed(line)
    assert counter.counts() == (2, 3, 1)
    status = {"state": "running", "phase": "build", "attempt": 2}
    assert progress_line(status, counter.counts(), 12.4) == (
        "running · phase build · attempt 2 · step 2/3 (1 cached) · 12s"
    )
    counter.reset()
    assert counter.counts() is None


def test_list_shows_recent_jobs_and_queue_depths(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)  # no worker: the jobs stay queued
    ids = [client.submit({"context": str(context_dir), "tags": [TAG]}).job_id for _ in range(3)]
    out = cli(buildq_env, "list", "--json", "--limit", "2")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    # newest first (jobs submitted within the same millisecond tie: any order among them)
    times = [row["enqueued_at"] for row in listed["jobs"]]
    assert len(times) == 2 and times == sorted(times, reverse=True)
    assert {row["job_id"] for row in listed["jobs"]} <= set(ids)
    assert all(row["state"] == "queued" and row["phase"] == "queued" for row in listed["jobs"])
    assert listed["queues"] == {buildq_env["BUILDQ_QUEUE"]: 3, buildq_env["BUILDQ_HIGH_PRIORITY_QUEUE"]: 0}
    human = cli(buildq_env, "list", "--state", "queued")
    assert human.returncode == 0 and ids[0] in human.stdout and "queued messages" in human.stdout
    assert json.loads(cli(buildq_env, "list", "--json", "--state", "failed").stdout)["jobs"] == []


def test_jobs_submitted_within_one_millisecond_are_listed_newest_first(buildq_env, context_dir) -> None:
    client = client_for(buildq_env)  # a submit takes a fraction of a millisecond: many share one
    ids = [client.submit({"context": str(context_dir), "tags": [TAG]}).job_id for _ in range(20)]
    listed = client.list_jobs(limit=20)
    assert [row["job_id"] for row in listed] == ids[::-1]


def test_retry_a_failed_job_names_the_old_one(buildq_env, start_worker, context_dir) -> None:
    start_worker(buildq_env)
    client = client_for(buildq_env)
    failing = scenario(kind="fail", error="failed to solve: process did not complete successfully")
    job = {"context": str(context_dir), "tags": [TAG], "build_args": {"STANDIN_SCENARIO": failing}}
    old = client.submit(job)
    assert old.wait(timeout=60)["state"] == "failed"
    assert cli(buildq_env, "retry", "no-such-job").returncode == 1
    out = cli(buildq_env, "retry", old.job_id, "--json")
    assert out.returncode == 0, out.stderr
    new_id = json.loads(out.stdout)["job_id"]
    assert new_id != old.job_id
    pending = client.status(new_id)
    assert pending["retry_of"] == old.job_id
    record = client.wait(new_id, timeout=60)
    assert record["retry_of"] == old.job_id and record["state"] == "failed"
    jsonschema.validate(record, record_schema())
    jsonschema.validate(pending, record_schema())
    assert client.status(old.job_id)["retry_of"] is None
    rows = json.loads(cli(buildq_env, "list", "--json", "--state", "failed").stdout)["jobs"]
    assert [(r["job_id"], r["retry_of"]) for r in rows] == [(new_id, old.job_id), (old.job_id, None)]


def test_retry_refuses_a_succeeded_job_and_cancel_a_finished_one(
    buildq_env, start_worker, context_dir
) -> None:
    start_worker(buildq_env)
    client = client_for(buildq_env)
    done = client.submit({"context": str(context_dir), "tags": [TAG]})
    assert done.wait(timeout=60)["state"] == "succeeded"
    out = cli(buildq_env, "retry", done.job_id)
    assert out.returncode == 1 and "succeeded" in out.stderr
    cancel = cli(buildq_env, "cancel", done.job_id)
    assert cancel.returncode == 1 and "already finished (succeeded)" in cancel.stderr
    assert client.store.redis.exists(f"buildq:cancel:{done.job_id}") == 0


def test_submit_wait_progress_plain_streams_the_log(buildq_env, start_worker, context_dir) -> None:
    start_worker(buildq_env)
    out = cli(buildq_env, "submit", "--context", str(context_dir), "-t", TAG, "--wait", "--progress", "plain")
    assert out.returncode == 0, out.stderr
    assert "#1 [internal] load build definition from Dockerfile" in out.stderr
    assert "attempt 1 started on" in out.stderr and "final: succeeded" in out.stderr
    assert "succeeded" in out.stdout


def test_live_wait_draws_progress_until_the_record() -> None:
    import io

    from rich.console import Console

    from buildq.cli.views import live_wait

    ticks = iter([0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    answers = iter([None, {"state": "succeeded"}])
    console = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    record = live_wait(
        lambda: {"state": "running", "phase": "build", "attempt": 1},
        lambda: (1, 2, 1),
        lambda wait_s: next(answers),
        console,
        timeout=None,
        clock=lambda: next(ticks),
    )
    assert record == {"state": "succeeded"}
    assert "running · phase build · step 1/2 (1 cached) · 1s" in console.file.getvalue()  # type: ignore[attr-defined]
