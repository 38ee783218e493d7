"""A producer is untrusted: what an attacker with only the right to enqueue tried (issue 26), against a
real worker (real Redis, real Celery pool processes, the buildctl stand-in), one test per case.

Each attack is refused (or masked) with the field named, nothing is launched for a refused job, the
worker stays up, and no other job's record changes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from buildq.engine.hooks import OTHER, PHASE_LABELS, SLOW_PHASE_LABELS
from buildq.store.keys import job_key, load_key, log_key
from tests.conftest import scenario
from tests.harness import clean_environ, client_for, free_port, settings_from, wait_until
from tests.harness import run_cli as cli
from tests.test_producers import raw_celery_message

pytestmark = pytest.mark.timeout(100)

WORKER_TOKEN = "wkr-Broker-Passw0rd-5e1b"


def push(env: dict[str, str], job: dict, *, task_id: str | None = None, tail: bool = False, **fields) -> None:
    """Send one raw ``buildq.build`` message as a stranger would (no client, no retries); ``tail``:
    at the consuming end of the list, so it is taken before everything already queued."""
    message = raw_celery_message(task_id or job["job_id"], env["BUILDQ_QUEUE"], {"job": job, **fields})
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    (r.rpush if tail else r.lpush)(env["BUILDQ_QUEUE"], message)


def push_and_wait(env: dict[str, str], job: dict, **fields) -> dict:
    push(env, job, **fields)
    return client_for(env).wait(job["job_id"], timeout=60)


def assert_refused(record: dict, field: str) -> None:
    assert record["state"] == "failed", record
    assert record["error"]["kind"] == "invalid", record["error"]
    assert record["error"]["field"] == field, record["error"]
    assert record["attempts"] == []


# -- 1. forged message fields never start an unwatched buildctl ---------------------------------


def test_forged_times_run_each_build_watched_within_its_slot_and_limit(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    """``enqueued_at`` "x" / NaN and forged attempts: each build runs in its slot (one at a time with
    BUILDQ_BUILDKIT_MAX_BUILDS=1), is ended by its time limit and leaves a record."""
    env = {**buildq_env, "BUILDQ_BUILDKIT_MAX_BUILDS": "1"}
    worker = start_worker(env, concurrency=3)
    forged = [
        {"enqueued_at": "x"},
        {"enqueued_at": float("nan"), "window_start": "x"},
        {"attempts": [{"number": 1, "started_at": 2001, "evil": True}] * 3, "waiting_since": -1e18},
    ]
    ids = []
    for index, fields in enumerate(forged):
        job_id = f"forged-{index}"
        ids.append(job_id)
        job = {
            "job_id": job_id, "context": str(context_dir), "tags": [f"reg/app:{index}"], "timeout_s": 2,
            # would take 10 s: its 2 s limit ends it (and a build left unwatched still ends by itself)
            "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=10)},
        }  # fmt: skip
        body = json.dumps([[], {"job": job, **fields}, {}], allow_nan=True)
        assert ("NaN" in body) == (index == 1)
        push(env, job, **fields)
    client = client_for(env)
    records = [client.wait(job_id, timeout=30) for job_id in ids]
    for record in records:
        assert record["state"] == "failed" and record["error"]["kind"] == "timeout", record
        assert len(record["attempts"]) == 1, record["attempts"]
        attempt = record["attempts"][0]
        assert "evil" not in attempt and attempt["started_at"].startswith(time.strftime("%Y"))
    starts = standin_log.starts()
    assert len(starts) == 3  # one buildctl each, and none of them still running
    assert not [e["pid"] for e in starts if os.path.exists(f"/proc/{e['pid']}")]
    spans = sorted((a["started_at"], a["finished_at"]) for rec in records for a in rec["attempts"])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # never two at once
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    for job_id in ids:  # no lease, no slot left behind
        lease_until, slot = r.hmget(job_key(job_id), "lease_until", "slot")
        assert lease_until == b"0" and not slot, (job_id, lease_until, slot)
    assert all(
        score == 0 for _, score in r.zrange(load_key(settings_from(env).daemons), 0, -1, withscores=True)
    )
    assert worker.proc.poll() is None


# -- 2. nothing the message carries becomes a record field or a metric label ---------------------


def test_forged_attempts_and_phases_are_not_believed(buildq_env, start_worker, context_dir, tmp_path) -> None:
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom")}
    start_worker(env, concurrency=2)
    phases = {f"phase{i}": 1.0 for i in range(2000)}
    job = {"job_id": "forged-phases", "context": str(context_dir), "tags": ["reg/app:1"]}
    fake = [{"number": n, "started_at": 2001, "phases": phases, "outcome": "failed"} for n in (1, 2)]
    record = push_and_wait(env, job, attempts=fake, enqueued_at=2001, window_start=2001, waiting_since=2001)
    assert record["state"] == "succeeded", record
    assert [a["number"] for a in record["attempts"]] == [1]
    assert "phase0" not in json.dumps(record) and "2001" not in json.dumps(record["attempts"])
    # an unknown message field is refused, named
    refused = push_and_wait(env, {**job, "job_id": "forged-phases-2"}, phases=phases)
    assert_refused(refused, "phases")
    text = wait_until(lambda: _metrics(port), timeout=30)
    labels = set(re.findall(r'phase="([^"]*)"', text))
    assert labels and labels <= {*PHASE_LABELS, *SLOW_PHASE_LABELS, OTHER}, labels
    assert len(text.splitlines()) < 2000


def _metrics(port: int) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return text if "buildq_build_phase_seconds_count" in text else None


# -- 3. an invalid message never writes another job's record -------------------------------------


def test_an_invalid_message_with_another_jobs_id_leaves_that_job_alone(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    client = client_for(buildq_env)
    victim = client.submit({"context": str(context_dir), "tags": ["reg/app:victim"]})
    bad = {"job_id": victim.job_id, "context": "relative", "tags": ["reg/app:x"]}
    push(buildq_env, bad, tail=True)  # taken first: its own delivery id is not the victim's
    push(buildq_env, {**bad, "job_id": f"{victim.job_id}:*\n../../x"}, task_id=victim.job_id, tail=True)
    push(buildq_env, {"context": "relative"}, task_id=victim.job_id, tail=True)
    worker = start_worker(buildq_env)
    record = victim.wait(timeout=60)
    assert record["state"] == "succeeded", record
    assert worker.proc.poll() is None
    assert len(standin_log.starts()) == 1
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    assert not [k for k in r.scan_iter("*") if b"\n" in k or b"../" in k]


# -- 4. pseudo-filesystems are never contexts ------------------------------------------------------


def test_proc_sys_dev_are_never_contexts_or_dockerfile_folders(
    buildq_env, start_worker, context_dir, tmp_path, standin_log
) -> None:
    """No BUILDQ_CONTEXT_ROOTS (the default): /proc/self/environ would be the worker's environment."""
    worker = start_worker({**buildq_env, "WORKER_BROKER_TOKEN": WORKER_TOKEN})
    (tmp_path / "self").symlink_to("/proc/self")
    (tmp_path / "ctx2").mkdir()
    (tmp_path / "ctx2" / "Dockerfile").symlink_to("/proc/self/environ")
    cases = [
        ({"context": "/proc/self", "dockerfile": "environ"}, "context"),
        ({"context": "/sys/kernel", "dockerfile": "uevent_seqnum"}, "context"),
        ({"context": "/dev", "dockerfile": "null"}, "context"),
        ({"context": "/", "dockerfile": "proc/self/environ"}, "context"),
        ({"context": str(tmp_path / "self"), "dockerfile": "environ"}, "context"),
        ({"context": str(tmp_path / "ctx2")}, "dockerfile"),
    ]
    for index, (fields, field) in enumerate(cases):
        record = push_and_wait(buildq_env, {"job_id": f"pseudo-{index}", "tags": ["reg/app:1"], **fields})
        assert_refused(record, field)
        assert "pseudo-filesystem" in record["error"]["message"]
        assert WORKER_TOKEN not in json.dumps(record)
    assert standin_log.events() == [] and worker.proc.poll() is None


# -- 5. masking: whole values, URL userinfo, the task's arguments, escaped forms --------------------


def test_git_userinfo_and_escaped_values_are_masked_in_records_and_logs(
    buildq_env, start_worker, standin_log
) -> None:
    token = "ghp-Us3rInfo-T0ken-77aa"
    env = {**buildq_env, "BUILDQ_SECRET_ENV": "BUILD_SECRET_*"}
    granted = 'gr4nted"Val\\ue-x1'
    start_worker({**env, "BUILD_SECRET_NPM": granted})
    url = f"https://builder:{token}@git.example/team/app.git#main"
    quoted = granted.replace("\\", "\\\\").replace('"', '\\"')
    error = f'failed to solve: failed to read dockerfile: git fetch "{url}": exit 128 (value "{quoted}")'
    job = {
        "job_id": "git-userinfo", "context": url, "tags": ["reg/app:1"],
        "secrets": [{"id": "npm", "env": "BUILD_SECRET_NPM"}],
        "build_args": {"STANDIN_SCENARIO": scenario(kind="fail", error=error, after_lines=4)},
    }  # fmt: skip
    record = push_and_wait(env, job)
    assert record["state"] == "failed", record
    everything = json.dumps(record) + cli(env, "logs", "git-userinfo").stdout
    everything += cli(env, "logs", "git-userinfo", "--raw").stdout
    assert token not in everything and quoted not in everything and granted not in everything
    assert "***" in record["error"]["message"]


def test_the_task_shows_the_job_id_and_tags_never_the_job_whatever_the_headers(
    buildq_env, start_worker, context_dir
) -> None:
    """``celery inspect active`` (what Flower's worker page shows) and Celery's result: the worker
    makes the task's argument view and ``ignore_result`` itself."""
    from celery import Celery

    signature = "X-Amz-Signature-0ff1ce-c0ffee"
    start_worker(buildq_env)
    job = {
        "job_id": "argsrepr", "context": str(context_dir), "tags": ["reg/app:1"], "timeout_s": 30,
        "build_args": {"SIG": signature, "STANDIN_SCENARIO": scenario(kind="hang", after_lines=3)},
    }  # fmt: skip
    message = json.loads(raw_celery_message("argsrepr", buildq_env["BUILDQ_QUEUE"], {"job": job}))
    message["headers"].pop("argsrepr")
    message["headers"]["kwargsrepr"] = json.dumps(job)  # a producer's own view, the signature in it
    message["headers"]["ignore_result"] = False
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    r.lpush(buildq_env["BUILDQ_QUEUE"], json.dumps(message))
    app = Celery(broker=buildq_env["BUILDQ_BROKER_URL"])

    def active() -> list[dict]:
        replies = app.control.inspect(timeout=2).active() or {}
        return [task for tasks in replies.values() for task in tasks]

    tasks = wait_until(active, timeout=30, interval=0.5)
    shown = json.dumps(tasks)
    assert signature not in shown, shown
    assert tasks[0]["kwargs"] == "{'job': 'argsrepr', 'tags': ['reg/app:1']}"
    client_for(buildq_env).cancel("argsrepr")
    assert client_for(buildq_env).wait("argsrepr", timeout=60)["state"] == "cancelled"
    wait_until(lambda: not active(), timeout=30, interval=0.5)  # the task is over, its result written
    backend = redis.Redis.from_url(buildq_env["BUILDQ_RESULT_BACKEND"])
    assert not list(backend.scan_iter("celery-task-meta-*"))  # BUILDQ_TASK_RESULTS off: no result


# -- 6. BUILDQ_* never granted, in any case ------------------------------------------------------


def test_lower_case_buildq_variables_are_never_granted(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    env = {**buildq_env, "BUILDQ_SECRET_ENV": "*"}
    start_worker({**env, "buildq_sentinel_password": WORKER_TOKEN, "Buildq_Other": WORKER_TOKEN})
    for index, name in enumerate(("buildq_sentinel_password", "Buildq_Other", "BUILDQ_BROKER_URL")):
        job = {"job_id": f"lower-{index}", "context": str(context_dir), "tags": ["reg/app:1"],
               "secrets": [{"id": "x", "env": name}]}  # fmt: skip
        record = push_and_wait(env, job)
        assert_refused(record, "secrets[0].env")
        assert "never granted" in record["error"]["message"]
    assert standin_log.events() == []


# -- 7. the log of a build is capped in bytes ------------------------------------------------------


def test_a_builds_log_is_capped_in_bytes_and_says_so(buildq_env, start_worker, context_dir) -> None:
    env = {**buildq_env, "BUILDQ_LOG_MAX_BYTES": "3000"}
    start_worker(env)
    record = client_for(env).submit({"context": str(context_dir), "tags": ["reg/app:1"]}).wait(timeout=60)
    assert record["state"] == "succeeded", record
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    stored = sum(len(v) for _, fields in r.xrange(log_key(record["job_id"])) for v in fields.values())
    assert stored < 3000 + 2000, stored  # the cap, its two notes and the entries' framing
    out = cli(env, "logs", record["job_id"], "--raw").stdout
    assert "log cut: this attempt's output passed 3000 bytes (BUILDQ_LOG_MAX_BYTES)" in out
    assert re.search(r"log cut: \d+ bytes in \d+ lines not kept", out)


# -- 8. the state folder is the worker's own -------------------------------------------------------


def test_the_worker_refuses_a_state_folder_another_user_owns(buildq_env, tmp_path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    code, err = start_refused({**buildq_env, "BUILDQ_LOCAL_STATE_DIR": str(planted)})
    assert code == 2 and "BUILDQ_LOCAL_STATE_DIR" in err and "owned by uid 65534" in err, err
    assert "Traceback" not in err
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    code, err = start_refused({**buildq_env, "BUILDQ_LOCAL_STATE_DIR": str(link)})
    assert code == 2 and "is a symlink" in err, err


def start_refused(env: dict[str, str], within_s: float = 20.0) -> tuple[int | None, str]:
    """``buildq worker``'s exit code and stderr; (None, ...) when it was still running after
    ``within_s`` (then it is stopped, pool and all)."""
    full = {**clean_environ("BUILDQ_"), **env}
    proc = subprocess.Popen([sys.executable, "-m", "buildq", "worker"], env=full, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=within_s)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err


# -- 9. smaller: non-ASCII tags, deeply nested job files; ssh:// contexts ---------------------------


def test_non_ascii_tags_and_ungranted_ssh_contexts_are_refused(buildq_env, start_worker, standin_log) -> None:
    start_worker(buildq_env)
    tag = push_and_wait(buildq_env, {"job_id": "tag-1", "context": "/srv/x", "tags": ["reg/app:v\u00e9"]})
    assert_refused(tag, "tags")
    ssh = {"job_id": "ssh-1", "context": "ssh://git@git.example/team/app.git", "tags": ["reg/app:1"]}
    record = push_and_wait(buildq_env, ssh)
    assert_refused(record, "context")
    assert "BUILDQ_GIT_TRANSPORTS" in record["error"]["message"]
    assert standin_log.events() == []


def test_a_deeply_nested_job_file_is_one_line_and_exit_2(buildq_env) -> None:
    out = cli(buildq_env, "submit", "--job-file", "-", stdin="[" * 100_000 + "]" * 100_000)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "buildq: invalid job: --job-file: '-' is nested too deeply to be a job"
    ]


def test_ssh_contexts_build_when_granted(buildq_env, start_worker) -> None:
    """The grant opens ssh:// (the stand-in then fails at the fetch: it was launched)."""
    env = {**buildq_env, "BUILDQ_GIT_TRANSPORTS": "https,ssh"}
    start_worker(env)
    fail = scenario(kind="fail", error="ssh: no key")
    job = {"job_id": f"ssh-{uuid.uuid4().hex[:6]}", "context": "ssh://git@git.example/team/app.git",
           "tags": ["reg/app:1"], "build_args": {"STANDIN_SCENARIO": fail}}  # fmt: skip
    record = push_and_wait(env, job)
    assert record["state"] == "failed" and record["error"]["kind"] != "invalid", record["error"]
    assert Path(env["STANDIN_LOG"]).exists()


def test_a_deeply_nested_message_leaves_the_worker_building(
    buildq_env, start_worker, context_dir, standin_log
) -> None:
    """A body nested 100,000 deep (and a job nested 400 deep): no job from it, the next one builds."""
    worker = start_worker(buildq_env)
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    message = json.loads(raw_celery_message("deep-1", buildq_env["BUILDQ_QUEUE"], {"job": {}}))
    message["body"] = base64.b64encode(("[" * 100_000 + "]" * 100_000).encode()).decode()
    r.lpush(buildq_env["BUILDQ_QUEUE"], json.dumps(message))
    deep: dict = {}
    for _ in range(400):
        deep = {"x": deep}
    push(buildq_env, {"job_id": "deep-2", "context": str(context_dir), "tags": ["reg/app:1"], "labels": deep})
    assert_refused(client_for(buildq_env).wait("deep-2", timeout=60), "labels.x")
    record = client_for(buildq_env).submit({"context": str(context_dir), "tags": ["reg/app:2"]}).wait(60)
    assert record["state"] == "succeeded", record
    assert worker.proc.poll() is None and len(standin_log.starts()) == 1
