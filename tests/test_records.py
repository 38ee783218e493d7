"""The record builders over data (pure): common fields, cache evidence, redaction, the retry's time
window, the Celery summary and Flower's arguments."""

from __future__ import annotations

from pathlib import Path

from buildq.buildkit.classify import Failure
from buildq.buildkit.progress import ProgressTracker
from buildq.celeryapp.producer import job_kwargsrepr
from buildq.celeryapp.task import BuildFailed, failure_text
from buildq.contract.job import parse_job
from buildq.engine.redact import Redactor
from buildq.records import (
    AttemptOutcome,
    attempt_record,
    final_record,
    outcome_state,
    redact_strings,
    summary,
    window_start_of,
)

CAPTURE = Path(__file__).parent / "fixtures" / "buildkit" / "builds" / "ctx_oci_rawjson_cold.stderr"
JOB = parse_job({"job_id": "j1", "context": "/srv/app", "tags": ["reg/app:1"]})


def finished(outcome: AttemptOutcome, state: str, error: dict | None = None) -> dict:
    attempt = attempt_record(outcome, window_start=99.0, window_end=outcome.exited_at + 0.01)
    return final_record(
        JOB, state=state, attempts=[attempt], last=outcome, enqueued_at=99.0,
        finished_at=outcome.exited_at + 0.01, error=error, worker="host:7",
    )  # fmt: skip


def test_a_failed_attempt_record_has_no_internal_window_and_no_cache_export() -> None:
    failure = Failure(transient=False, reason="run_step", message="failed to solve: exit code: 1")
    outcome = AttemptOutcome(1, "tcp://bk:1234", 100.0, 101.0, "failed", exit_code=1, failure=failure)
    state, error = outcome_state(outcome)
    record = finished(outcome, state, error)
    assert "window_end" not in record["attempts"][0]
    assert (record["phase"], record["attempt"], record["worker"], record["daemon"]) == (
        "done", 1, "host:7", "tcp://bk:1234"
    )  # fmt: skip
    assert record["cache"] == {
        "ref": "reg/app:buildcache", "imported": False, "import_error": None, "exported": False, "error": None
    }  # fmt: skip


def test_a_succeeded_record_takes_the_cache_from_the_stream_and_metadata() -> None:
    tracker = ProgressTracker(clock=lambda: 100.1)
    for line in CAPTURE.read_text().splitlines():
        tracker.feed(line)
    meta = {"containerimage.digest": "sha256:" + "a" * 64, "cache.manifest": "{}"}
    outcome = AttemptOutcome(1, "tcp://bk:1234", 100.0, 101.0, "succeeded", 0, None, meta, tracker, 100.1)
    record = finished(outcome, "succeeded")
    assert record["cache"]["exported"] is True and record["cache"]["imported"] is False
    bare = AttemptOutcome(1, "d", 100.0, 101.0, "succeeded", 0, None, {}, tracker, 100.1)
    without = finished(bare, "succeeded")
    assert without["cache"]["exported"] is False and "cache.manifest" in without["cache"]["error"]


def test_redact_strings_masks_every_string_and_keeps_the_rest() -> None:
    attempts = [{"error": "x s3cr3tvalue", "n": 1}]
    record = {"error": {"message": "pw=s3cr3tvalue"}, "attempts": attempts, "k": None}
    masked = redact_strings(record, Redactor(["s3cr3tvalue"]).redact)
    assert masked == {"error": {"message": "pw=***"}, "attempts": [{"error": "x ***", "n": 1}], "k": None}
    assert redact_strings(record, None) is record


def test_the_next_window_starts_where_the_previous_ended() -> None:
    assert window_start_of([], 5.0, 1.0) == 1.0  # a first attempt: the enqueue
    earlier = [{"finished_at": "2026-11-28T05:22:28.500Z"}]
    assert window_start_of(earlier, 7.25, 1.0) == 7.25  # carried by the retry message
    assert window_start_of([{**earlier[0], "window_end": 6.5}], None, 1.0) == 6.5  # an older worker's
    assert window_start_of(earlier, None, 1.0) == 1795843348.5


def test_summary_and_failure_for_celery_and_flower() -> None:
    failure = Failure(transient=True, reason="grpc_unavailable", message="code = Unavailable\n desc = eof")
    outcome = AttemptOutcome(1, "d", 100.0, 101.0, "failed", exit_code=1, failure=failure)
    state, error = outcome_state(outcome)
    record = finished(outcome, state, error)
    brief = summary(record)
    assert brief["state"] == "failed" and brief["error"] == "transient_exhausted" and brief["attempts"] == 1
    assert brief["phases"] == record["phases"] and brief["steps"] is None
    assert len(repr(BuildFailed(failure_text(record), brief))) < 1024  # Flower shows it whole
    assert failure_text(record) == "failed: transient_exhausted: code = Unavailable desc = eof"


def test_flower_arguments_are_the_job_id_and_tags() -> None:
    assert job_kwargsrepr(JOB.to_message()) == "{'job': 'j1', 'tags': ['reg/app:1']}"
    assert job_kwargsrepr('{"job_id": "j2", "tags": ["a"]}') == "{'job': 'j2', 'tags': ['a']}"
    assert job_kwargsrepr(["not", "a", "job"]) == "{'job': '?'}"
