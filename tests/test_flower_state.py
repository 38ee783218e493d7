"""What Flower shows, through the event state Flower itself keeps (``celery.events.state.State``,
fed by a real event receiver): a running build is ``STARTED`` (its "Started" filter finds it),
and a build that was retried shows each attempt with its reason."""

from __future__ import annotations

import threading
import time
from typing import Any

from buildq.celeryapp.app import create_app
from tests.conftest import scenario
from tests.harness import client_for, settings_from, wait_until


def watch(env: dict[str, str]) -> tuple[Any, list[dict], Any]:
    """A Flower-like event state of the deployment, filled in a thread; (state, events, receiver)."""
    app = create_app(settings_from(env))
    state = app.events.State()
    events: list[dict] = []
    receivers: list[Any] = []
    ready = threading.Event()

    def on_event(event: dict) -> None:
        events.append(event)
        state.event(event)

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": on_event})
            receivers.append(receiver)
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(10)
    time.sleep(0.5)  # the receiver's queue is bound before anything is sent
    return state, events, receivers[0]


def task_state(state: Any, task_id: str) -> str | None:
    """The task's state in the receiver's view; None until its first event is in (the worker
    publishes its task events in batches, BUILDQ_EVENT_BATCH_S, so a producer may hear of the
    record first)."""
    task = state.tasks.get(task_id)
    return None if task is None else task.state


def test_a_running_build_is_started_and_retries_show_their_reasons(
    buildq_env, start_worker, context_dir, tmp_path
) -> None:
    start_worker(buildq_env)
    state, events, receiver = watch(buildq_env)
    client = client_for(buildq_env)
    hanging = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/fl:1"],
            "build_args": {"STANDIN_SCENARIO": scenario(kind="hang")},
        }
    )
    # the build's phases are published while it runs; the task stays STARTED through them
    wait_until(
        lambda: any(
            e["type"] == "buildq-phase" and e["uuid"] == hanging.job_id and e["phase"] == "launch"
            for e in events
        ),
        timeout=30,
    )
    time.sleep(0.5)  # later phase events, if any, are in
    task = state.tasks[hanging.job_id]
    assert task.state == "STARTED"
    assert [uuid for uuid, t in state.tasks_by_time() if t.state == "STARTED"] == [hanging.job_id]
    hanging.cancel()
    assert hanging.wait(timeout=60)["state"] == "cancelled"
    wait_until(lambda: task_state(state, hanging.job_id) == "FAILURE", timeout=10)
    # goaway on the first attempt, then success: the task view has both attempts and the reason
    flaky = scenario(kind="flaky", state_dir=str(tmp_path / "st"), fail_first=1, key="logs", seed=6)  # goaway
    retried = client.submit(
        {"context": str(context_dir), "tags": ["reg/fl:2"], "build_args": {"STANDIN_SCENARIO": flaky}}
    )
    assert retried.wait(timeout=60)["state"] == "succeeded"
    wait_until(lambda: task_state(state, retried.job_id) == "SUCCESS", timeout=10)
    receiver.should_stop = True
    task = state.tasks[retried.job_id]
    assert "attempt 1 failed (goaway); retry in" in task.exception
    assert "[attempts: #1 failed (goaway)]" in task.exception
    assert "'history': ['#1 failed (goaway)', '#2 succeeded']" in task.result
    assert task.retries == 1
