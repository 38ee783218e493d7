"""The record tells the truth, through a real worker (local launcher + stand-in): the cache export
decided from evidence, secrets redacted wherever a record or message is written, what Celery (and
so Flower) shows, and what the worker log says about an expected build failure."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import redis
from celery.result import AsyncResult

from buildq.celeryapp.app import create_app
from tests.conftest import scenario
from tests.harness import client_for, free_port, settings_from, wait_until
from tests.harness import run_cli as cli
from tests.standin.scenarios import cache_export_failed, daemons_env, fail, scenario_json
from tests.test_observability import scrape

SECRET = "Tok3n-hunter2-s3cr3t"


def _build(client: Any, context_dir: Any, tag: str, sc: dict[str, Any] | None = None, **job: Any) -> Any:
    body: dict[str, Any] = {"context": str(context_dir), "tags": [tag], **job}
    if sc is not None:
        body["build_args"] = {"STANDIN_SCENARIO": scenario_json(sc)}
    return client.submit(body)


def test_cache_export_and_import_are_decided_from_evidence(buildq_env, start_worker, context_dir, tmp_path):
    port = free_port()
    env = {
        **buildq_env,
        **daemons_env(tmp_path / "daemons"),  # cache affinity: the second build of a ref is warm
        "BUILDQ_METRICS_PORT": str(port),
        "BUILDQ_METRICS_DIR": str(tmp_path / "prom"),
    }
    start_worker(env, concurrency=1)
    client = client_for(env)

    def build(tag: str, sc: dict[str, Any] | None = None, **job: Any) -> dict[str, Any]:
        record: dict[str, Any] = _build(client, context_dir, tag, sc, **job).wait(timeout=60)
        return record

    # buildctl exits 0 (ignore-error=true) while the export vertex carries the registry's error
    broken = build("127.0.0.1:5000/demo/broken:1", cache_export_failed())
    assert broken["state"] == "succeeded" and broken["image"]["pushed"] is True
    assert broken["cache"]["exported"] is False
    assert broken["cache"]["error"].startswith("error writing layer blob: failed to do request: Head ")
    assert broken["cache"]["imported"] is False  # cold: the import's "not found" is a miss ...
    assert broken["cache"]["import_error"] is None  # ... not an error
    human = cli(env, "status", broken["job_id"])
    assert human.returncode == 0 and "not exported: error writing layer blob" in human.stdout

    cold = build("127.0.0.1:5000/demo/app:1")
    assert cold["cache"] == {
        "ref": "127.0.0.1:5000/demo/app:buildcache",
        "imported": False,
        "import_error": None,
        "exported": True,
        "error": None,
        "imports": ["127.0.0.1:5000/demo/app:buildcache"],  # its scope's ref (no scope: the one ref)
        "export": "exported",  # it held the ref's export lease (docs/cache-scopes.md)
    }
    warm = build("127.0.0.1:5000/demo/app:2")  # same cache ref: the daemon's cache is warm
    assert warm["cache"]["imported"] is True and warm["cache"]["exported"] is True

    failed = build("127.0.0.1:5000/demo/bad:1", fail("failed to solve: dockerfile parse error on line 1"))
    assert failed["state"] == "failed"
    assert failed["cache"]["exported"] is False and failed["cache"]["error"] is None

    local = build("127.0.0.1:5000/demo/local:1", push=False)  # no --export-cache at all
    assert local["state"] == "succeeded" and local["cache"]["exported"] is False

    samples = scrape(port)
    assert samples['buildq_cache_exports_total{outcome="exported"}'] == 2.0
    assert samples['buildq_cache_exports_total{outcome="failed"}'] == 1.0
    assert samples['buildq_cache_exports_total{outcome="skipped"}'] == 1.0


# ---- secrets ---------------------------------------------------------------------------------


def _secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode()]


def _message_texts(value: bytes) -> list[str]:
    """A stored value, and for a kombu message its decoded body too."""
    text = value.decode("utf-8", errors="replace")
    out = [text]
    try:
        message = json.loads(text)
    except ValueError:
        return out
    if isinstance(message, dict) and isinstance(message.get("body"), str):
        out.append(base64.b64decode(message["body"]).decode("utf-8", errors="replace"))
    return out


def redis_texts(url: str) -> list[str]:
    """Every value stored in one Redis DB, as text (message bodies decoded)."""
    r = redis.Redis.from_url(url)
    texts: list[str] = []
    for key in r.scan_iter():
        kind = r.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [r.get(key) or b""]
        elif kind == "hash":
            values = list(r.hgetall(key).values())
        elif kind == "list":
            values = list(r.lrange(key, 0, -1))
        elif kind == "zset":
            values = list(r.zrange(key, 0, -1))
        elif kind == "stream":
            values = [v for _, fields in r.xrange(key) for v in fields.values()]
        for value in values:
            texts += _message_texts(value)
    return texts


def assert_no_secret(texts: list[str], where: str) -> None:
    for text in texts:
        for form in _secret_forms(SECRET):
            assert form not in text, f"secret in {where}: {text[:300]}"


def _retry_message(broker_url: str, job_id: str) -> dict[str, Any] | None:
    """The retried message while its attempt runs (unacknowledged until then), body decoded."""
    r = redis.Redis.from_url(broker_url)
    for raw in r.hvals("unacked"):
        message, _exchange, _queue = json.loads(raw)
        if message["headers"]["id"] == job_id and message["headers"]["retries"] >= 1:
            message["decoded"] = json.loads(base64.b64decode(message["body"]))
            return dict(message)
    return None


def test_a_secret_in_a_transient_error_is_masked_in_record_retry_message_and_celery(
    buildq_env, start_worker, context_dir, standin_log
):
    # a registry credential in the URL of a failing request: the registry is away, so the build is
    # tried again until BUILDQ_REGISTRY_WAIT_S has passed (here: once more)
    text = (
        'failed to solve: failed to do request: Head "https://ci:' + SECRET + "@registry.example/v2/app/"
        'blobs/sha256:0f": dial tcp 10.0.0.1:443: connect: connection refused'
    )
    env = {
        **buildq_env,
        "BUILDQ_RETRY_MAX_ATTEMPTS": "2",
        "BUILDQ_REGISTRY_WAIT_S": "2.5",
        "BQ_TEST_TOKEN": SECRET,
        "BUILDQ_SECRET_ENV": "BQ_TEST_TOKEN",  # granted: a job may name it
        "STANDIN_SCENARIO": scenario(kind="fail", error=text, sleep_s=1.5),
    }
    start_worker(env)
    client = client_for(env)
    secrets = [{"id": "tok", "env": "BQ_TEST_TOKEN"}]
    handle = client.submit({"context": str(context_dir), "tags": ["reg/sec:1"], "secrets": secrets})
    wait_until(lambda: len(standin_log.starts()) >= 2, timeout=30)
    retry = _retry_message(env["BUILDQ_BROKER_URL"], handle.job_id)
    assert retry is not None
    between = client.store.info(handle.job_id).get("attempts")  # the history the workers keep
    record = handle.wait(timeout=60)
    assert record["state"] == "failed" and record["error"]["kind"] == "transient_exhausted"
    masked = text.replace(SECRET, "***")
    assert record["error"]["message"] == masked
    assert [a["error"] for a in record["attempts"]] == [masked, masked]
    # the retried message carries the job and its delivery id only (the history stays in Redis,
    # redacted there too); Flower's short arguments kept
    _, kwargs, _ = retry["decoded"]
    assert set(kwargs) == {"job", "delivery"}
    assert between is not None and [a["error"] for a in json.loads(between)] == [masked]
    assert "window_end" not in json.loads(between)[0]
    assert retry["headers"]["kwargsrepr"] == f"{{'job': {handle.job_id!r}, 'tags': ['reg/sec:1']}}"
    assert_no_secret(_message_texts(json.dumps(retry).encode()), "the retry message")
    assert_no_secret(redis_texts(env["BUILDQ_BROKER_URL"]), "the broker/state DB")
    assert_no_secret(redis_texts(env["BUILDQ_RESULT_BACKEND"]), "the Celery result backend")


def test_a_secret_in_the_failing_steps_error_line_is_masked_everywhere(buildq_env, start_worker, context_dir):
    step = f'process "/bin/sh -c curl -fsS -u ci:{SECRET} https://example.test/upload" did not complete'
    text = f"failed to solve: {step} successfully: exit code: 22"
    env = {**buildq_env, "BUILDQ_REDACT_ENV": "BQ_REGISTRY_PASSWORD", "BQ_REGISTRY_PASSWORD": SECRET,
           "BUILDQ_TASK_RESULTS": "true"}  # Celery's result backend written too: masked there  # fmt: skip
    worker = start_worker({**env, "STANDIN_SCENARIO": scenario(kind="fail", error=text)})
    client = client_for(env)
    handle = client.submit({"context": str(context_dir), "tags": ["reg/sec:2"]})
    record = handle.wait(timeout=60)
    assert record["state"] == "failed" and record["error"]["kind"] == "permanent"
    assert record["error"]["message"] == text.replace(SECRET, "***")
    assert record["attempts"][0]["error"] == text.replace(SECRET, "***")
    app = create_app(settings_from(env))
    wait_until(lambda: AsyncResult(handle.job_id, app=app).state == "FAILURE", timeout=10)
    assert_no_secret(redis_texts(env["BUILDQ_BROKER_URL"]), "the broker/state DB")
    assert_no_secret(redis_texts(env["BUILDQ_RESULT_BACKEND"]), "the Celery result backend")
    wait_until(lambda: handle.job_id in worker.log(), timeout=10)
    assert_no_secret([worker.log()], "the worker log")


# ---- what Celery and Flower show; the worker log ----------------------------------------------


def _celery_meta(env: dict[str, str], job_id: str) -> dict[str, Any]:
    """The task's Celery result (stored just after buildq's record: waited for)."""
    r = redis.Redis.from_url(env["BUILDQ_RESULT_BACKEND"])
    raw = wait_until(lambda: r.get(f"celery-task-meta-{job_id}"), timeout=10)
    return dict(json.loads(raw))


def test_celery_result_summary_has_phases_and_steps(buildq_env, start_worker, context_dir) -> None:
    buildq_env = {**buildq_env, "BUILDQ_TASK_RESULTS": "true"}  # producers that read Celery's results
    start_worker(buildq_env)
    client = client_for(buildq_env)
    # two repositories: two builds of one cache ref at once would share its export lease
    ok = _build(client, context_dir, "reg/sum-ok:1")
    parse_error = fail("failed to solve: dockerfile parse error on line 1")
    bad = _build(client, context_dir, "reg/sum-bad:1", parse_error)
    record = ok.wait(timeout=60)
    bad.wait(timeout=60)
    meta = _celery_meta(buildq_env, ok.job_id)
    assert meta["status"] == "SUCCESS"
    summary = meta["result"]
    assert summary["phases"] == record["phases"]
    assert summary["steps"] == record["steps"]
    assert summary["cache_exported"] is True
    assert summary["attempts"] == 1
    meta = _celery_meta(buildq_env, bad.job_id)
    assert meta["status"] == "FAILURE"
    failure = meta["result"]
    assert failure["exc_type"] == "BuildFailed"
    text, summary = failure["exc_message"]
    assert text == "failed: permanent: failed to solve: dockerfile parse error on line 1"
    assert summary["state"] == "failed" and summary["error"] == "permanent" and "phases" in summary


def test_expected_failure_is_one_warning_line_a_crash_is_an_error(
    buildq_env, start_worker, context_dir
) -> None:
    worker = start_worker(buildq_env)
    client = client_for(buildq_env)
    bad = _build(client, context_dir, "reg/log:1", fail("failed to solve: dockerfile parse error on line 1"))
    bad.wait(timeout=60)
    wait_until(lambda: "WARNING" in worker.log() and bad.job_id in worker.log(), timeout=10)
    log = worker.log()
    mine = [line for line in log.splitlines() if bad.job_id in line and "received" not in line]
    started, ended = mine  # the build's start line, and its end: one WARNING line
    assert "INFO" in started and "attempt 1 started" in started
    assert "WARNING" in ended and "failed (permanent" in ended
    assert "ERROR" not in log and "Traceback" not in log
    # a message field of an older producer is read past, never believed: no crash
    app = create_app(settings_from(buildq_env))
    legacy = {"job_id": "legacy-1", "context": str(context_dir), "tags": ["reg/log:3"]}
    app.send_task("buildq.build", kwargs={"job": legacy, "enqueued_at": "not-a-time"}, task_id="legacy-1",
                  queue=buildq_env["BUILDQ_QUEUE"])  # fmt: skip
    assert client.wait("legacy-1", timeout=60)["state"] == "succeeded"
    assert "ERROR" not in worker.log() and "Traceback" not in worker.log()
    # a real crash (the job's state in Redis is corrupt) still logs an error with its traceback
    crash_id = "crash-1"
    r = client.store.redis
    r.hset(f"buildq:job:{crash_id}", "record", "{not json")
    job = {"job_id": crash_id, "context": str(context_dir), "tags": ["reg/log:2"]}
    app.send_task("buildq.build", kwargs={"job": job}, task_id=crash_id, queue=buildq_env["BUILDQ_QUEUE"])
    wait_until(lambda: re.search(r"ERROR.*crash-1", worker.log()), timeout=30)
    assert "Traceback" in worker.log()
    # the message went back to the queue (not acknowledged as if built): with the state repaired,
    # the job is built
    r.hdel(f"buildq:job:{crash_id}", "record")
    assert client.wait(crash_id, timeout=60)["state"] == "succeeded"
