"""Job logs in a capped Redis Stream: live batches, follow across attempts, cap and TTL, redaction."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from buildq.buildkit.plainlog import PlainLogRenderer
from buildq.buildkit.progress import parse_line
from buildq.client.logview import PlainView, plain
from buildq.engine.attemptlog import AttemptLog, RawRedactor
from buildq.engine.redact import Redactor
from buildq.engine.scheduler import Scheduler
from buildq.store.keys import log_key
from buildq.store.logs import LogEntry, LogStore, final_state, format_entry, show_attempts
from tests.harness import REDIS_URL, free_port
from tests.test_plainlog import feed_line

FIX = Path(__file__).parent / "fixtures" / "buildkit"
CTX = FIX / "builds" / "ctx_oci_rawjson_cold.stderr"
TRACE = FIX / "extra" / "extra_cachemetrics_trace_cold.trace.json"
SYNTAX = FIX / "errors" / "err_iv_syntax_rawjson.stderr"
JOB = "job-1"
SECRET = "hunter2-Sup3rSecret"
T0 = 1_800_000_000.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{REDIS_URL}/12", socket_timeout=5)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def store(r: redis.Redis) -> LogStore:
    return LogStore(r, maxlen=100_000, ttl_s=3600)


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def render(lines: list[str], redactor: Redactor | None = None) -> list[str]:
    renderer = PlainLogRenderer(redact=redactor.redact if redactor else None)
    return [out for line in lines for out in feed_line(renderer, line)] + renderer.finish()


def texts(entries: list[LogEntry], kind: str) -> list[str]:
    return [e.line for e in entries if e.kind == kind]


def plain_texts(entries: list[LogEntry]) -> list[str]:
    """The plain view of stored (raw) entries, as ``buildq logs`` renders it."""
    return texts(plain(entries), "plain")


def wait_until(r: redis.Redis, job_id: str, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Block on the stream (XREAD) until ``done()``; fail after ``timeout_s``."""
    last, deadline = "0-0", time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "stream never reached the expected state"
        reply: Any = r.xread({log_key(job_id): last}, block=100)
        if reply:
            last = reply[0][1][-1][0].decode()


def replay(
    store: LogStore, lines: list[str], attempt: int = 1, redactor: Redactor | None = None
) -> AttemptLog:
    log = AttemptLog(store, JOB, attempt, redactor=redactor)
    for i, line in enumerate(lines):
        log.feed(line)
        if i % 50 == 49:
            log.flush()  # as the process's scheduler does every FLUSH_EVERY_S
    log.close()
    return log


def end(store: LogStore, log: AttemptLog, state: str) -> list[str]:
    """End the log as the lifecycle does when the job is over: what is not written yet, with the
    ``final:`` mark, goes with the result (the finish script appends it to the stream in the same
    round trip; here :meth:`LogStore.append`); the failing step's tail is returned."""
    pending, tail = log.ending(state)
    store.append(log.job_id, pending)
    return tail


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    s = Scheduler()
    yield s
    s.stop()


def vertex_output(raw_lines: list[str]) -> dict[str, bytes]:
    """The step output carried by raw lines, concatenated per vertex."""
    out: dict[str, bytes] = {}
    for line in raw_lines:
        status = parse_line(line)
        for entry in status.logs if status else ():
            out[entry.vertex] = out.get(entry.vertex, b"") + base64.b64decode(entry.data_b64)
    return out


# -- each line stored once, raw; the plain view rendered from it ---------------------------------
@pytest.mark.parametrize("path", [CTX, TRACE], ids=["ctx_oci_cold", "trace_cold"])
def test_replayed_capture_stores_the_raw_lines_once_and_reads_as_the_renderers_plain_lines(
    store: LogStore, path: Path
) -> None:
    lines = lines_of(path)
    log = replay(store, lines)
    entries = store.read(JOB, kinds=("plain", "raw", "mark"))
    assert texts(entries, "plain") == []  # nothing stored twice
    assert texts(entries, "raw") == lines
    assert plain_texts(entries) == render(lines)
    assert {e.attempt for e in entries} == {1}
    assert log.flushes >= 1 and log.failed_flushes == log.dropped == 0


@pytest.mark.parametrize("path", [CTX, TRACE], ids=["ctx_oci_cold", "trace_cold"])
def test_with_a_redactor_raw_lines_still_replay_to_the_stored_plain_lines(
    store: LogStore, path: Path
) -> None:
    lines, redactor = lines_of(path), Redactor(["no-such-secret-anywhere"])
    replay(store, lines, redactor=redactor)
    entries = store.read(JOB)
    shown, raw = plain_texts(entries), texts(entries, "raw")
    assert shown == render(lines, redactor)
    assert render(raw, redactor) == shown
    assert vertex_output(raw) == vertex_output(lines)


def test_buildctl_text_lines_are_stored_once_and_shown_as_they_are(store: LogStore) -> None:
    lines = lines_of(SYNTAX)
    text = [ln for ln in lines if parse_line(ln) is None]
    assert text[-1].startswith("error: ")
    replay(store, lines)
    entries = store.read(JOB)
    shown = plain_texts(entries)
    assert [ln for ln in shown if ln not in text] == render(lines)
    assert [ln for ln in shown if ln in text] == text  # in arrival order (before the finish() summary)
    assert texts(entries, "raw") == lines


def test_feed_accepts_an_already_parsed_status(store: LogStore) -> None:
    lines = lines_of(TRACE)
    log = AttemptLog(store, JOB, 1, redactor=None)
    for line in lines:
        log.feed(line, parse_line(line))
    log.close()
    assert plain_texts(store.read(JOB)) == render(lines)


# -- live: batches while the build runs ---------------------------------------------------------
def test_lines_are_readable_before_close(store: LogStore, r: redis.Redis, scheduler: Scheduler) -> None:
    lines = lines_of(TRACE)
    half = lines[: len(lines) // 2]
    renderer = PlainLogRenderer()  # what the renderer gives before finish()
    expected = [out for line in half for out in feed_line(renderer, line)]
    assert len(expected) > 10
    log = AttemptLog(store, JOB, 1, redactor=None)
    scheduler.every(0.02, log.flush)  # the lifecycle has the process's scheduler flush it
    for line in half:
        log.feed(line)
    wait_until(r, JOB, lambda: len(store.read(JOB)) >= len(half))
    view = PlainView()
    assert texts(list(view.feed(store.read(JOB))), "plain") == expected  # read while it runs
    for line in lines[len(half) :]:
        log.feed(line)
    log.close()
    assert plain_texts(store.read(JOB)) == render(lines)


def test_a_flush_writes_what_is_buffered_in_one_round_trip_and_nothing_when_empty(
    store: LogStore, r: redis.Redis
) -> None:
    log = AttemptLog(store, JOB, 1, redactor=None)
    for i in range(10):
        log.feed(f"text line {i}")  # one entry each (raw)
    assert store.read(JOB) == []  # feeding writes nothing: the scheduler's flush does
    log.flush()
    assert log.flushes == 1 and plain_texts(store.read(JOB)) == [f"text line {i}" for i in range(10)]
    assert r.xlen(log_key(JOB)) == 1  # the batch is one stream entry
    assert 0 < r.ttl(log_key(JOB)) <= 3600  # set with the attempt's first batch
    log.flush()
    assert log.flushes == 1  # nothing buffered: no round trip
    log.close()
    assert plain_texts(store.read(JOB)) == [f"text line {i}" for i in range(10)]


def test_close_is_idempotent_and_the_final_mark_goes_with_the_result_once(store: LogStore) -> None:
    log = AttemptLog(store, JOB, 2, redactor=None)
    log.feed("error: boom")
    log.close()
    log.close()
    log.feed("late line")  # ignored after close
    assert [(e.attempt, e.kind, e.line) for e in store.read(JOB)] == [(2, "raw", "error: boom")]
    end(store, log, "failed")  # after close: only the final mark is left to store
    entries = store.read(JOB)
    assert [(e.attempt, e.kind, e.line, e.closes) for e in entries] == [
        (2, "raw", "error: boom", False),
        (2, "mark", "final: failed", True),
    ]
    assert final_state(entries) == "failed"


def test_close_before_a_retry_writes_its_note_last(store: LogStore) -> None:
    log = AttemptLog(store, JOB, 1, redactor=None)
    log.feed("error: goaway")
    log.close("attempt 1 failed (goaway); retrying in 0.80s")
    entries = store.read(JOB)
    assert [(e.kind, e.line, e.closes) for e in entries] == [
        ("raw", "error: goaway", False),
        ("mark", "attempt 1 failed (goaway); retrying in 0.80s", True),
    ]
    assert final_state(entries) is None  # the job goes on


def test_an_ending_without_any_line_still_has_the_final_mark(store: LogStore) -> None:
    pending, tail = AttemptLog(store, JOB, 1, redactor=None).ending("cancelled")
    assert pending == [(1, "end", "final: cancelled")] and tail == []
    store.append(JOB, pending)
    assert texts(store.read(JOB), "mark") == ["final: cancelled"]


# -- follow ---------------------------------------------------------------------------------------
def test_follow_sees_lines_live_and_ends_after_the_final_mark_across_attempts(store: LogStore) -> None:
    first, second = lines_of(CTX), lines_of(TRACE)
    half = len(first) // 2
    seen_live = threading.Event()
    writer_done = threading.Event()
    live: list[bool] = []

    def write() -> None:
        log1 = AttemptLog(store, JOB, 1, redactor=None)
        for line in first[:half]:
            log1.feed(line)
        log1.flush()  # the scheduler's flush while attempt 1 runs
        live.append(seen_live.wait(10))  # the follower sees attempt 1 lines while attempt 1 still runs
        for line in first[half:]:
            log1.feed(line)
        log1.close("attempt 1 failed (goaway); retrying in 0.8s")
        log2 = AttemptLog(store, JOB, 2, redactor=None)
        for line in second:
            log2.feed(line)
        log2.flush()
        end(store, log2, "succeeded")
        writer_done.set()

    writer = threading.Thread(target=write)
    writer.start()
    got: list[LogEntry] = []
    view = PlainView()
    for entry in view.feed(store.follow(JOB, is_finished=lambda: False, block_ms=100)):
        got.append(entry)
        seen_live.set()
    writer.join()
    assert writer_done.is_set() and live == [True]
    expected = [(1, "plain", ln) for ln in render(first)]
    expected.append((1, "mark", "attempt 1 failed (goaway); retrying in 0.8s"))
    expected += [(2, "plain", ln) for ln in render(second)]
    expected.append((2, "mark", "final: succeeded"))
    got = [e for e in got if " started on " not in e.line or e.kind != "mark"]
    assert [(e.attempt, e.kind, e.line) for e in got] == expected
    assert final_state(got) == "succeeded" and show_attempts(got)


def test_follow_sees_the_first_lines_before_the_writer_goes_on(store: LogStore) -> None:
    log = AttemptLog(store, JOB, 1, redactor=None)
    log.feed("step one")
    log.flush()
    follower = store.follow(JOB, kinds=("raw",), is_finished=lambda: False, block_ms=100)
    assert next(follower).line == "step one"  # nothing else was written yet: it came live
    log.feed("step two")
    log.flush()
    assert next(follower).line == "step two"
    end(store, log, "succeeded")
    assert list(follower) == []  # the final mark (not among kinds) ends it


def test_follow_ends_when_the_job_is_finished_and_nothing_more_arrives(store: LogStore) -> None:
    store.append(JOB, [(1, "raw", "a"), (1, "raw", "b")])  # a worker that died: no final mark
    got = list(store.follow(JOB, is_finished=lambda: True, block_ms=50))
    assert [e.line for e in got] == ["a", "b"]
    assert final_state(got) is None


def test_follow_reads_the_finishing_write_that_lands_between_an_empty_wait_and_the_finished_check(
    store: LogStore,
) -> None:
    store.append(JOB, [(1, "raw", "a")])
    log = AttemptLog(store, JOB, 1, redactor=None)
    checks: list[bool] = []

    def finishing_write_lands_now() -> bool:  # the worker's finish: last lines, final mark, record
        if not checks:
            log.feed("b")
            end(store, log, "succeeded")
        checks.append(True)
        return True

    got = list(store.follow(JOB, is_finished=finishing_write_lands_now, block_ms=50))
    assert [e.line for e in got if e.kind == "raw"] == ["a", "b"]
    assert final_state(got) == "succeeded"


def test_read_pages_and_filters(store: LogStore) -> None:
    for batch in range(500):  # 500 stream entries of 5 lines: several pages
        store.append(JOB, [(1, "raw" if i % 2 else "mark", f"l{i}") for i in range(batch * 5, batch * 5 + 5)])
    marks = store.read(JOB, kinds=("mark",))
    assert [e.line for e in marks] == [f"l{i}" for i in range(0, 2500, 2)]
    assert [e.line for e in store.read(JOB, kinds=("mark",), count=3)] == ["l0", "l2", "l4"]
    after = marks[600].id  # the stream entry of l1200: read from the next entry on
    assert [e.line for e in store.read(JOB, kinds=("raw",), after=after, count=2)] == ["l1205", "l1207"]
    assert store.read("no-such-job") == []


# -- cap and TTL ----------------------------------------------------------------------------------
def test_stream_is_capped_approximately_and_expires(r: redis.Redis) -> None:
    store = LogStore(r, maxlen=100, ttl_s=60)
    log = AttemptLog(store, JOB, 1, redactor=None)
    for i in range(2500):
        log.feed(f"line {i}")
        log.flush()  # 2,500 stream entries
    end(store, log, "succeeded")
    # MAXLEN ~ only drops whole stream nodes: at least maxlen entries stay, and fewer than maxlen
    # plus one node (stream-node-max-entries, 100 by default)
    config: Any = r.config_get("stream-node-max-entries")
    node = int(config["stream-node-max-entries"])
    assert node > 0
    assert 100 <= r.xlen(log_key(JOB)) < 100 + node
    assert store.read(JOB)[-1].line == "final: succeeded"  # the newest entries are kept
    assert 0 < r.ttl(log_key(JOB)) <= 60


# -- secrets ----------------------------------------------------------------------------------------
def ts(seconds: float) -> str:
    return datetime.fromtimestamp(T0 + seconds, UTC).isoformat().replace("+00:00", "Z")


def vtx(digest: str, name: str, start: float, stop: float | None = None, **kw: Any) -> str:
    v: dict[str, Any] = {
        "digest": digest,
        "name": name,
        "inputs": ["sha256:base"],
        "started": ts(start),
        **kw,
    }
    if stop is not None:
        v["completed"] = ts(stop)
    return json.dumps({"vertexes": [v]})


def log_line(digest: str, at: float, data: bytes) -> str:
    entry = {"vertex": digest, "stream": 1, "data": base64.b64encode(data).decode(), "timestamp": ts(at)}
    return json.dumps({"logs": [entry]})


def secret_build() -> list[str]:
    s = SECRET.encode()
    lines = [vtx("a", f"[1/1] RUN echo {SECRET}", 0.0)]
    lines += [log_line("a", 0.1 + k / 10, b"x" * k + s + b" tail\n") for k in range(3)]  # each base64 offset
    lines += [log_line("a", 0.5, b"split " + s[:7]), log_line("a", 0.6, s[7:] + b" done\n")]
    lines += [
        log_line("a", 0.7, b"three " + s[:3]),
        log_line("a", 0.8, s[3:9]),
        log_line("a", 0.9, s[9:] + b"\n"),
    ]
    lines.append(log_line("a", 1.0, b"last " + s))  # never terminated: released when the step ends
    lines.append(vtx("a", f"[1/1] RUN echo {SECRET}", 0.0, 1.1, error=f"exit code 1 ({SECRET})"))
    return lines


def test_a_plain_text_redact_of_raw_lines_would_leak_the_secret() -> None:
    """Sanity check of the fixture: masking the JSON text cannot catch base64 at offsets 1 and 2."""
    naive = [Redactor([SECRET]).redact(line) for line in secret_build()]
    assert SECRET.encode() in b"".join(vertex_output(naive).values())


def test_secret_in_step_output_is_masked_in_plain_raw_and_failing_tail(store: LogStore) -> None:
    lines, redactor = secret_build(), Redactor([SECRET])
    log = AttemptLog(store, JOB, 1, redactor=redactor)
    for line in lines:
        log.feed(line)
    tail = end(store, log, "failed")
    entries = store.read(JOB)
    shown, raw = plain_texts(entries), texts(entries, "raw")
    assert not [ln for ln in shown + raw if SECRET in ln]
    output = vertex_output(raw)["a"]
    assert SECRET.encode() not in output
    assert output.count(b"***") == 6  # three offsets, two splits, the unterminated line
    assert shown == render(lines, redactor)
    assert render(raw, redactor) == shown
    assert "#1 0.500 split *** done" in shown
    assert "#1 0.700 three ***" in shown
    assert tail == [
        "*** tail",
        "x*** tail",
        "xx*** tail",
        "split *** done",
        "three ***",
        "last ***",
    ]


def compact(line: str) -> str:
    return json.dumps(json.loads(line), separators=(",", ":"))


def test_raw_redactor_keeps_each_line_start_with_its_own_timestamp() -> None:
    raw = RawRedactor(Redactor([SECRET]).redact)
    assert raw.line(log_line("a", 0.1, b"hel")) == [compact(log_line("a", 0.1, b""))]  # held, timestamp kept
    assert raw.line(log_line("a", 0.2, b"lo\nwor")) == [compact(log_line("a", 0.1, b"hello\n"))]
    assert raw.finish() == [compact(log_line("a", 0.2, b"wor"))]
    assert raw.finish() == []
    assert raw.line("not json " + SECRET) == ["not json ***"]


# -- failures and formatting ----------------------------------------------------------------------
def test_redis_failure_in_a_flush_never_reaches_feed_flush_or_close() -> None:
    # no retries: redis-py's default (10 retries, backoff capped at 1 s) spends ~4 s per failed write
    dead = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    log = AttemptLog(LogStore(dead, maxlen=100, ttl_s=60), JOB, 1, redactor=None)
    for line in lines_of(CTX):
        log.feed(line)
    log.flush()  # on the scheduler's thread: the error is counted, not raised
    assert log.failed_flushes == 1
    log.feed("error: after the first failure")
    log.close("retrying")
    assert log.failed_flushes == 2 and log.flushes == 0
    assert log.dropped == len(lines_of(CTX)) + 1 + 1  # each line once, the error line, the note


class GatedStore(LogStore):
    """A LogStore whose first write waits for ``gate``: Redis falling behind the build."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.gate = threading.Event(), threading.Event()

    def append(self, job_id: str, entries: Any, *, first: bool = False) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        super().append(job_id, entries, first=first)


def test_when_redis_falls_behind_only_the_newest_maxlen_entries_wait(r: redis.Redis) -> None:
    store = GatedStore(r, maxlen=50, ttl_s=60)
    log = AttemptLog(store, JOB, 1, redactor=None)
    log.feed("line 0")
    flushing = threading.Thread(target=log.flush)  # the scheduler's thread
    flushing.start()
    assert store.entered.wait(10)  # the flush is stuck writing line 0
    for i in range(1, 201):
        log.feed(f"line {i}")  # 200 entries; 50 may wait, the older ones would be trimmed anyway
    store.gate.set()
    flushing.join(10)
    end(store, log, "failed")
    assert log.dropped == 200 - 50 and log.failed_flushes == 0
    assert plain_texts(store.read(JOB)) == [f"line {i}" for i in [0, *range(151, 201)]]
    assert final_state(store.read(JOB)) == "failed"


def test_format_entry_and_final_state() -> None:
    line, mark = LogEntry("1-0", 2, "plain", "#1 DONE 0.1s"), LogEntry("2-0", 2, "mark", "final: failed")
    assert format_entry(line, show_attempt=False) == "#1 DONE 0.1s"
    assert format_entry(line, show_attempt=True) == "[attempt 2] #1 DONE 0.1s"
    assert format_entry(mark, show_attempt=True) == "--- attempt 2: final: failed ---"
    assert format_entry(mark, show_attempt=False) == "--- final: failed ---"
    assert final_state([line, mark]) == "failed" and final_state([line]) is None
    assert not show_attempts([line, mark])
