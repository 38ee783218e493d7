"""The record builders over data (pure): common fields, cache evidence, redaction, the retry's time
window, the Celery summary and Flower's arguments."""

from __future__ import annotations

from pathlib import Path

from buildq.buildkit.classify import Failure
from buildq.buildkit.progress import ProgressTracker
from buildq.celeryapp.task import BuildFailed, failure_text
from buildq.contract.job import parse_job
from buildq.contract.record import summary
from buildq.contract.wire import job_kwargsrepr
from buildq.engine.recording import conclude, outcome_error
from buildq.engine.redact import Redactor
from buildq.engine.runner import Outcome

CAPTURE = Path(__file__).parent / "fixtures" / "buildkit" / "builds" / "ctx_oci_rawjson_cold.stderr"
JOB = parse_job({"job_id": "j1", "context": "/srv/app", "tags": ["reg/app:1"]})


def finished(outcome: Outcome, state: str, **kw: object) -> dict:
    concluded = conclude(
        JOB, outcome, [], offset=0.0, window_start=99.0, window_end=outcome.exited_at + 0.01, state=state,
        enqueued_at=99.0, worker="host:7", **kw,
    )  # fmt: skip
    assert concluded.record is not None
    return concluded.record


def state_of(outcome: Outcome) -> str:
    """The record's state for the last attempt's outcome (what the lifecycle decides)."""
    return (
        "succeeded"
        if outcome.outcome == "succeeded"
        else "cancelled"
        if outcome.outcome == "cancelled"
        else "failed"
    )


def test_a_failed_attempt_record_has_no_internal_window_and_no_cache_export() -> None:
    failure = Failure(transient=False, reason="run_step", message="failed to solve: exit code: 1")
    outcome = Outcome(1, "tcp://bk:1234", 100.0, 101.0, "failed", exit_code=1, failure=failure)
    record = finished(outcome, state_of(outcome))
    assert "window_end" not in record["attempts"][0]
    assert record["error"] == outcome_error(outcome) == {
        "kind": "permanent", "reason": "run_step", "message": "failed to solve: exit code: 1"
    }  # fmt: skip
    assert (record["phase"], record["attempt"], record["worker"], record["daemon"]) == (
        "done", 1, "host:7", "tcp://bk:1234"
    )  # fmt: skip
    assert record["cache"] == {
        "ref": "reg/app:buildcache", "imported": False, "import_error": None, "exported": False,
        "error": None, "export": "skipped",
    }  # fmt: skip


def test_a_succeeded_record_takes_the_cache_from_the_stream_and_metadata() -> None:
    tracker = ProgressTracker(clock=lambda: 100.1)
    for line in CAPTURE.read_text().splitlines():
        tracker.feed(line)
    meta = {"containerimage.digest": "sha256:" + "a" * 64, "cache.manifest": "{}"}
    outcome = Outcome(1, "tcp://bk:1234", 100.0, 101.0, "succeeded", 0, None, meta, tracker)
    record = finished(outcome, "succeeded")
    assert record["cache"]["exported"] is True and record["cache"]["imported"] is False
    assert record["image"]["digest"] == meta["containerimage.digest"] and record["error"] is None
    bare = Outcome(1, "d", 100.0, 101.0, "succeeded", 0, None, {}, tracker)
    without = finished(bare, "succeeded")
    assert without["cache"]["exported"] is False and "cache.manifest" in without["cache"]["error"]


def test_redact_tree_masks_every_string_and_keeps_the_rest() -> None:
    attempts = [{"error": "x s3cr3tvalue", "n": 1}]
    record = {"error": {"message": "pw=s3cr3tvalue"}, "attempts": attempts, "k": None}
    masked = Redactor(["s3cr3tvalue"]).redact_tree(record)
    assert masked == {"error": {"message": "pw=***"}, "attempts": [{"error": "x ***", "n": 1}], "k": None}


def test_the_record_and_its_attempts_are_masked() -> None:
    failure = Failure(transient=False, reason="run_step", message="token s3cr3tvalue refused")
    outcome = Outcome(1, "tcp://bk:1234", 100.0, 101.0, "failed", exit_code=1, failure=failure)
    record = finished(outcome, "failed", redactor=Redactor(["s3cr3tvalue"]))
    assert record["error"]["message"] == "token *** refused"
    assert record["attempts"][0]["error"] == "token *** refused"
    assert "s3cr3tvalue" not in repr(record)


def test_an_attempts_time_window_starts_where_the_caller_says() -> None:
    """The window of a retry starts where the previous attempt's ended (the ``window_start`` the
    workers wrote into Redis, not anything the message carries); a first attempt's at the enqueue.
    The attempt's phases tile that window, and the record's phases are the sum of its attempts'."""
    failure = Failure(transient=True, reason="goaway", message="received prior goaway")
    first = Outcome(1, "d0", 100.0, 101.0, "failed", exit_code=1, failure=failure)
    one = conclude(JOB, first, [], offset=0.0, window_start=99.0, window_end=101.5)
    assert one.record is None and one.entry is not None  # the job goes on: an entry, no record
    assert one.entry["phases"]["queued"] == 1.0 and one.entry["phases"]["total"] == 2.5
    second = Outcome(2, "d1", 103.0, 104.0, "failed", exit_code=1, failure=failure)
    two = conclude(JOB, second, one.attempts, offset=0.0, window_start=101.5, window_end=104.25,
                   state="failed", enqueued_at=99.0)  # fmt: skip
    assert two.record is not None and two.entry is not None
    assert two.entry["phases"]["queued"] == 1.5 and two.entry["phases"]["total"] == 2.75
    assert two.record["phases"]["total"] == 5.25  # 99.0 -> 104.25: the attempts' windows tile it
    assert [a["number"] for a in two.record["attempts"]] == [1, 2]
    assert two.record["error"]["kind"] == "transient_exhausted"


def test_a_workers_clock_is_shifted_to_the_servers() -> None:
    """The worker measures on its clock; the record is on the Redis server's (``offset``)."""
    outcome = Outcome(
        1, "d0", 100.0, 101.0, "succeeded", 0, None, {"containerimage.digest": "sha256:" + "b" * 64}
    )
    concluded = conclude(JOB, outcome, [], offset=1000.0, window_start=1099.0, window_end=1101.5,
                         state="succeeded", enqueued_at=1099.0)  # fmt: skip
    record = concluded.record
    assert record is not None
    assert record["attempts"][0]["started_at"] == "1970-01-01T00:18:20.000Z"  # 1100.0
    assert record["finished_at"] == "1970-01-01T00:18:21.500Z" and record["duration_s"] == 1.5
    assert record["phases"]["queued"] == 1.0


def test_summary_and_failure_for_celery_and_flower() -> None:
    failure = Failure(transient=True, reason="grpc_unavailable", message="code = Unavailable\n desc = eof")
    outcome = Outcome(1, "d", 100.0, 101.0, "failed", exit_code=1, failure=failure)
    record = finished(outcome, state_of(outcome))
    brief = summary(record)
    assert brief["state"] == "failed" and brief["error"] == "transient_exhausted" and brief["attempts"] == 1
    assert brief["phases"] == record["phases"] and brief["steps"] == record["steps"]
    assert brief["steps"] == {"total": 0, "cached": 0, "executed": 0, "cache_hit_ratio": 0.0}
    assert len(repr(BuildFailed(failure_text(record), brief))) < 1024  # Flower shows it whole
    assert failure_text(record) == "failed: transient_exhausted: code = Unavailable desc = eof"


def test_flower_arguments_are_the_job_id_and_tags() -> None:
    assert job_kwargsrepr(JOB.to_message()) == "{'job': 'j1', 'tags': ['reg/app:1']}"
    assert job_kwargsrepr('{"job_id": "j2", "tags": ["a"]}') == "{'job': 'j2', 'tags': ['a']}"
    assert job_kwargsrepr(["not", "a", "job"]) == "{'job': '?'}"
