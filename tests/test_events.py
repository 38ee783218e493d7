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
