"""Batched buildq-phase events: a real Celery app and the real Redis broker (DB 12)."""

from __future__ import annotations

import json
import time
from base64 import b64decode
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from buildq.celeryapp.app import create_app
from buildq.celeryapp.task import BUFFER_LIMIT, FLUSH_AFTER_S, PhaseEvents
from buildq.config import load_settings
from buildq.engine.scheduler import Scheduler
from tests.harness import REDIS_URL

DB = 12


@pytest.fixture
def app() -> Iterator[Any]:
    redis.Redis.from_url(f"{REDIS_URL}/{DB}").flushdb()
    settings = load_settings(
        {"BUILDQ_BROKER_URL": f"{REDIS_URL}/{DB}", "BUILDQ_RESULT_BACKEND": f"{REDIS_URL}/{DB}"}
    )
    yield create_app(settings)


@pytest.fixture
def published() -> Iterator[Any]:
    """Every event message published on the broker, as the list of events it carries."""
    sub = redis.Redis.from_url(f"{REDIS_URL}/{DB}").pubsub(ignore_subscribe_messages=True)
    sub.psubscribe("*celeryev*")
    messages: list[list[dict[str, Any]]] = []

    def collect(wait_s: float = 0.0) -> list[list[dict[str, Any]]]:
        deadline = time.monotonic() + wait_s
        while True:
            msg = sub.get_message(timeout=0.05)
            if msg is not None:
                body = json.loads(msg["data"])["body"]
                events = json.loads(b64decode(body))
                messages.append(events if isinstance(events, list) else [events])
            elif time.monotonic() >= deadline:
                return messages

    yield collect
    sub.close()


class ManualClock:
    """A scheduler clock that moves only when told (a timed flush happens when the test says)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[ManualClock]:
    yield ManualClock()


@pytest.fixture
def scheduler(clock: ManualClock) -> Iterator[Scheduler]:
    s = Scheduler(clock=clock)
    yield s
    s.stop()


def advance(clock: ManualClock, scheduler: Scheduler, seconds: float) -> None:
    """Move the scheduler's clock and wake it (it sleeps in real time until what it last saw due)."""
    clock.now += seconds
    scheduler.soon(lambda: None)


def send(events: PhaseEvents, job: str, phase: str) -> None:
    events.send("celery@test", uuid=job, job_id=job, attempt=1, phase=phase, seconds=0.1)


def test_events_of_many_builds_go_out_as_one_message_within_an_interval(
    app, published, clock, scheduler
) -> None:
    events = PhaseEvents(app, scheduler)
    for i in range(10):
        for phase in ("queued", "launch", "finalize"):
            send(events, f"job-{i}", phase)
    assert published(wait_s=0.3) == []  # buffered: nothing sent before the interval is over
    advance(clock, scheduler, FLUSH_AFTER_S)
    batches = published(wait_s=2.0)
    assert len(batches) == 1
    got = batches[0]
    assert [(e["type"], e["job_id"], e["phase"]) for e in got][:3] == [
        ("buildq-phase", "job-0", "queued"),
        ("buildq-phase", "job-0", "launch"),
        ("buildq-phase", "job-0", "finalize"),
    ]
    assert len(got) == 30 and all(e["hostname"] == "celery@test" for e in got)
    send(events, "job-late", "queued")  # the next interval's flush sends it
    advance(clock, scheduler, FLUSH_AFTER_S)
    assert [[e["job_id"] for e in batch] for batch in published(wait_s=2.0)[1:]] == [["job-late"]]


def test_a_full_buffer_is_published_at_once(app, published, scheduler) -> None:
    events = PhaseEvents(app, scheduler)  # the scheduler's clock stands still: no timed flush
    for i in range(BUFFER_LIMIT):
        send(events, f"job-{i}", "queued")
    assert [len(batch) for batch in published(wait_s=0.5)] == [BUFFER_LIMIT]


def test_nothing_buffered_nothing_sent_by_the_timed_flush(app, published, clock, scheduler) -> None:
    PhaseEvents(app, scheduler)
    for _ in range(3):
        advance(clock, scheduler, FLUSH_AFTER_S)
        time.sleep(0.05)
    assert published(wait_s=0.3) == []


def test_flush_sends_what_is_buffered_now(app, published, scheduler) -> None:
    events = PhaseEvents(app, scheduler)
    send(events, "job-x", "finalize")
    events.flush()
    assert [[e["phase"] for e in batch] for batch in published(wait_s=0.5)] == [["finalize"]]
    events.flush()  # nothing buffered: nothing sent
    assert len(published(wait_s=0.2)) == 1


def test_the_worker_s_consumer_publishes_its_task_events_in_batches() -> None:
    """The first buffered task event schedules one flush BUILDQ_EVENT_BATCH_S later; events
    buffered meanwhile ride along; once it ran, the next event schedules the next one."""
    from types import SimpleNamespace

    from buildq.celeryapp.worker import EventBatchingConsumer

    scheduled: list[tuple[float, Any]] = []
    flushed: list[int] = []

    class Hub:
        def call_later(self, delay: float, callback: Any, *args: Any) -> None:
            scheduled.append((delay, callback))

    consumer = EventBatchingConsumer.__new__(EventBatchingConsumer)  # no broker: the hook alone
    consumer.app = SimpleNamespace(buildq_settings=SimpleNamespace(event_batch_s=0.25))
    consumer.hub = Hub()
    consumer._flush_events = lambda: flushed.append(1)  # type: ignore[method-assign]
    for _ in range(5):
        consumer.on_send_event_buffered()
    assert [delay for delay, _ in scheduled] == [0.25] and flushed == []
    scheduled[0][1]()
    assert flushed == [1]
    consumer.on_send_event_buffered()
    assert len(scheduled) == 2


def test_a_real_worker_sends_every_task_event_in_fewer_messages(
    buildq_env, start_worker, context_dir, tmp_path
) -> None:
    """The production configuration (metrics on, two pool processes): every build's received,
    started and succeeded events reach an event receiver (Flower), several to a message."""
    from tests.harness import client_for, free_port

    env = {
        **buildq_env,
        "BUILDQ_METRICS_PORT": str(free_port()),
        "BUILDQ_METRICS_DIR": str(tmp_path / "m"),
        "BUILDQ_EVENT_BATCH_S": "2",  # the builds' events fall in a few batches on any machine
    }
    start_worker(env, concurrency=2)
    client = client_for(env)
    warm = client.submit({"context": str(context_dir), "tags": ["reg/warm:1"]})
    assert warm.wait(60)["state"] == "succeeded"
    sub = redis.Redis.from_url(env["BUILDQ_BROKER_URL"]).pubsub(ignore_subscribe_messages=True)
    sub.psubscribe("*celeryev*")
    sub.get_message(timeout=0.5)  # the subscription is on
    handles = [client.submit({"context": str(context_dir), "tags": [f"reg/e{i}:1"]}) for i in range(6)]
    assert all(h.wait(60)["state"] == "succeeded" for h in handles)
    ours = {h.job_id for h in handles}
    seen: dict[str, set[str]] = {job_id: set() for job_id in ours}
    messages = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(len(kinds) < 3 for kinds in seen.values()):
        msg = sub.get_message(timeout=0.2)
        if msg is None:
            continue
        events = json.loads(b64decode(json.loads(msg["data"])["body"]))
        events = events if isinstance(events, list) else [events]
        task_events = [e for e in events if e.get("uuid") in ours and e["type"].startswith("task-")]
        messages += bool(task_events)
        for e in task_events:
            seen[e["uuid"]].add(e["type"])
    sub.close()
    assert all(kinds >= {"task-received", "task-started", "task-succeeded"} for kinds in seen.values()), seen
    assert messages <= len(ours)  # 18 events; a message each without batching
