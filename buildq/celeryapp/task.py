"""The ``buildq.build`` Celery task: a thin shell around :class:`buildq.engine.lifecycle.Lifecycle`.

It reads the message (:func:`buildq.contract.wire.read_delivery`: the job and a delivery id,
nothing else believed), hands it to this pool process's lifecycle and carries out the
:class:`~buildq.engine.lifecycle.Ending`: a finished build returns its summary (or raises
:class:`BuildFailed`), a requeued one tells Celery ``Retry`` (its next message is already
published; this one is acknowledged), a dropped delivery is acknowledged without a result. When
Redis is away the message goes back to the queue; anything unexpected is logged with its
traceback, the claim was given back (the next claim records the lost attempt and its error) and
the message goes back too, so a task never ends as FAILURE beside a job still ``queued``.

A build that ends failed or cancelled raises :class:`BuildFailed` (an expected exception of the
task: Celery stores FAILURE, Flower shows it with the summary); the worker log gets one WARNING
line for it (from the engine's :class:`~buildq.engine.hooks.LogHook`) instead of Celery's line per
failure (:class:`ExpectedFailureFilter`). A requeued build raises Celery's ``Retry`` with the
attempts so far and their reasons (:func:`requeue_text`): Celery's ``retry:`` log line and
Flower's task view (its exception field) show why.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from celery import Celery, Task
from celery.exceptions import Reject, Retry
from celery.worker.request import Request

from ..config import Settings
from ..contract.wire import job_kwargsrepr, read_delivery
from ..engine.lifecycle import Progress
from ..engine.runtime import MainRuntime, PoolRuntime
from ..engine.scheduler import Scheduler
from ..errors import RedisUnavailable
from ..names import BUILDING, TASK_NAME

log = logging.getLogger("buildq.tasks")

#: what redis-py raises when Redis is away
REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

#: unexpected errors in a row after which a pool process stops taking jobs (it exits; Celery
#: starts another)
BROKEN_AFTER = 3


class BuildRequest(Request):
    """A delivered ``buildq.build`` message as this worker shows and runs it, whatever its headers
    say: its arguments are shown as the job id and tags (:func:`job_kwargsrepr`, made here from the
    body: ``celery inspect active``, Flower, the worker log and Celery's events never show a URL
    context's query or userinfo, nor a build arg), and whether its result is stored is the task's
    setting (``BUILDQ_TASK_RESULTS``), not the producer's ``ignore_result``."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        try:
            _, body_kwargs, _ = self._payload
            job = body_kwargs.get("job") if isinstance(body_kwargs, dict) else None
        except (TypeError, ValueError):
            job = None
        ignore = self._task.ignore_result
        shown = {"argsrepr": "()", "kwargsrepr": job_kwargsrepr(job), "ignore_result": ignore}
        self._request_dict.update(shown)  # what the pool process's trace and the result see
        self._argsrepr, self._kwargsrepr = shown["argsrepr"], shown["kwargsrepr"]
        self._ignore_result = shown["ignore_result"]

    def info(self, safe: bool = False) -> dict[str, Any]:
        """What ``celery inspect active/reserved/scheduled`` (and Flower) show: the argument view
        above, even when asked for the arguments themselves (``safe=False``, their default)."""
        return super().info(safe=True)


class BuildFailed(Exception):
    """Raised after the failed (or cancelled) record is stored, so Celery and Flower show the task
    as FAILURE: ``args`` are the one-line reason (redacted, like the record) and the summary."""

    def __init__(self, text: str, summary: dict[str, Any]) -> None:
        super().__init__(text, summary)


def failure_text(record: dict[str, Any]) -> str:
    """``<state>: <error kind>: <message>`` on one line (the record is already redacted)."""
    error = record.get("error") or {}
    text = f"{record['state']}: {error.get('kind')}: {error.get('message')}"
    return " ".join(text.split())


class BuildRetried(Exception):
    """What a requeued build tells Celery (``Retry(exc=...)``): Flower shows it as the task's
    exception while the build waits and runs again."""


def attempts_text(attempts: Sequence[dict[str, Any]]) -> str:
    """``#1 failed (goaway), #2 lost (worker_lost)``."""
    return ", ".join(
        f"#{a.get('number', i + 1)} {a.get('outcome')}" + (f" ({a['reason']})" if a.get("reason") else "")
        for i, a in enumerate(attempts)
    )


def requeue_text(phase: str, attempts: Sequence[dict[str, Any]], countdown: float) -> str:
    """One line on why a build went back to its queue: the attempt that failed and its reason and
    error (a retry), or the wait for a daemon; then every attempt so far."""
    if phase == "retry_wait" and attempts:
        last = attempts[-1]
        error = " ".join(str(last.get("error") or "").split())[:300]
        text = (
            f"attempt {last.get('number', len(attempts))} {last.get('outcome')} "
            f"({last.get('reason') or 'unknown'}); retry in {countdown:.2f}s"
        ) + (f": {error}" if error else "")
    else:
        text = f"waiting for a BuildKit daemon (all full or down); next try in {countdown:.2f}s"
    return f"{text} [attempts: {attempts_text(attempts)}]" if attempts else text


class ExpectedFailureFilter(logging.Filter):
    """Drops Celery's own log line of an expected ``BuildFailed`` (the task logs its WARNING)."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        return not (isinstance(data, dict) and str(data.get("exc", "")).startswith("BuildFailed("))


EXPECTED_FAILURE_FILTER = ExpectedFailureFilter()


class TaskProgress(Progress):
    """Live progress through Celery: the task state shows the current phase (``BUILDING``), an
    event per ended phase (batched, :mod:`buildq.celeryapp.task`). State writes run on the
    process's scheduler, never on the build's thread."""

    def __init__(self, task: Task, runtime: Any, events: PhaseEvents) -> None:
        self.backend, self.runtime, self.events = task.backend, runtime, events
        #: the task's live state is written only with BUILDQ_TASK_RESULTS (Celery's result backend)
        self.states = bool(runtime.settings.task_results)
        self.task_id: str = task.request.id
        self.hostname: str = task.request.hostname or "buildq"
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """The task is over: no state is written after this returns (one being written is waited
        for), so a late ``BUILDING`` never covers the task's result."""
        with self._lock:
            self._closed = True

    def phase(self, job_id: str, attempt: int, phase: str) -> None:
        if self.states:
            self.runtime.scheduler.soon(self._state, job_id, attempt, phase)

    def phases_ended(self, job_id: str, attempt: int, ended: Sequence[tuple[str, float]]) -> None:
        try:
            for phase, seconds in ended:
                self.events.send(
                    self.hostname, uuid=self.task_id, job_id=job_id, attempt=attempt, phase=phase,
                    seconds=round(seconds, 3),
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the build goes on
            log.warning("phase event not sent: %s", exc)

    def daemon_down(self, daemon: str, error: str) -> None:
        try:
            self.events.send_now(self.hostname, DAEMON_DOWN_EVENT, daemon=daemon, error=error)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("daemon event not sent: %s", exc)

    def _state(self, job_id: str, attempt: int, phase: str) -> None:
        with self._lock:
            if self._closed:  # the task is over: a late progress state must not cover its result
                return
            self.backend.store_result(
                self.task_id, {"job_id": job_id, "attempt": attempt, "phase": phase}, BUILDING
            )


class WorkerProcesses:
    """The runtime of the process this runs in (reached through ``app.buildq_worker``)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self._lock = threading.Lock()
        self._pool: tuple[int, PoolRuntime, PhaseEvents] | None = None
        self.main: MainRuntime | None = None
        #: unexpected task errors in a row in this process, and whether it should end after its task
        self.failures = 0
        self.exit_after_task = False

    def start_pool_process(self) -> None:
        """Make this pool process's runtime (``worker_process_init``; the solo pool: first task)."""
        with self._lock:
            if self._pool is not None and self._pool[0] == os.getpid():
                return
            runtime = PoolRuntime(self.settings)
            self._pool = (os.getpid(), runtime, PhaseEvents(self.app, runtime.scheduler))
            self.failures = 0

    def failed(self) -> bool:
        """A task of this process raised something unexpected; True when that happened
        :data:`BROKEN_AFTER` times in a row: the process cannot build and should end."""
        self.failures += 1
        return self.failures >= BROKEN_AFTER

    def succeeded(self) -> None:
        self.failures = 0

    def pool(self) -> PoolRuntime:
        self.start_pool_process()
        assert self._pool is not None
        return self._pool[1]

    def events(self) -> PhaseEvents:
        self.start_pool_process()
        assert self._pool is not None
        return self._pool[2]

    def stop_pool_process(self) -> None:
        """This pool process ends: buffered events out, scheduler stopped, launcher released."""
        with self._lock:
            made, self._pool = self._pool, None
        if made is None or made[0] != os.getpid():
            return
        _, runtime, events = made
        events.flush()
        runtime.close()


def register(app: Celery) -> None:
    """Register ``buildq.build`` on ``app`` (late acks and reject-on-lost come from the app config)."""

    # Celery logs an expected exception (``throws``) at INFO without traceback; that line goes,
    # the task's WARNING says it once (celery.app.trace is the logger of task outcomes)
    logging.getLogger("celery.app.trace").addFilter(EXPECTED_FAILURE_FILTER)

    @app.task(name=TASK_NAME, bind=True, max_retries=None, throws=(BuildFailed,), Request=BuildRequest)
    def build(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        runtime = self.app.buildq_worker.pool()
        request = self.request
        delivery = read_delivery(
            args, kwargs, task_id=request.id,
            queue=(request.delivery_info or {}).get("routing_key"), retries=request.retries,
        )  # fmt: skip
        progress = TaskProgress(self, runtime, self.app.buildq_worker.events())
        try:
            ending = runtime.lifecycle.handle(delivery, progress)
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            RedisUnavailable,
        ) as lost_redis:
            # Redis went away: hand the message back instead of acknowledging a build without a
            # record (if the broker is down too, it stays unacknowledged and comes back)
            raise Reject(f"redis unavailable: {lost_redis}", requeue=True) from None
        except Exception:
            log.exception("build %s: unexpected error; the message goes back to the queue", request.id)
            if self.app.buildq_worker.failed():
                log.error("this pool process failed %d builds in a row: it stops; Celery starts another",
                          BROKEN_AFTER)  # fmt: skip
                self.app.buildq_worker.exit_after_task = True
            raise Reject("unexpected error on the worker", requeue=True) from None
        finally:
            progress.close()  # progress states end before the task's result is stored
        self.app.buildq_worker.succeeded()
        if ending.kind == "requeued":
            text = requeue_text(ending.reason, ending.attempts, ending.countdown)
            raise Retry(message=text, exc=BuildRetried(text), when=ending.countdown)
        if ending.kind == "dropped":
            raise Reject(ending.reason, requeue=False)
        record, brief = ending.record, ending.summary
        assert record is not None and brief is not None
        if record["state"] != "succeeded":  # its WARNING line is the engine's (LogHook)
            raise BuildFailed(failure_text(record), brief)
        return brief


# ----------------------------------------------------------------------------------------------
# ``buildq-phase`` Celery events, published in batches.
#
# Not a ``task-…`` event: Celery's event state (Flower's) makes any ``task-<x>`` event the task's
# state ``<X>``, so a running build would leave Flower's ``STARTED`` filter; a ``buildq-…`` event
# carries the same fields (``uuid`` is the task id) and leaves the task ``STARTED``.
#
# :meth:`PhaseEvents.send` only buffers (no I/O). A flush publishes everything buffered as one
# ``buildq.multi`` message (Celery's own event batching, which Flower and other event receivers
# unpack). It runs on the process's :class:`~buildq.engine.scheduler.Scheduler` every
# FLUSH_AFTER_S (10 s) while events wait, at once when 50 are waiting, and when the worker process
# stops: one message carries the phases that ended meanwhile, of every build of the process,
# instead of one message per phase; the price is that an event is seen up to 10 s after its phase
# ended (often after the task's ``task-succeeded``: receivers keep the final state).
log = logging.getLogger("buildq.events")

#: custom event type sent as each phase ends (``job_id``, ``attempt``, ``phase``, ``seconds``)
PHASE_EVENT = "buildq-phase"
#: sent when a worker opens (``…-down``) or closes (``…-up``) a daemon's circuit breaker
DAEMON_DOWN_EVENT = "buildq-daemon-down"
DAEMON_UP_EVENT = "buildq-daemon-up"
#: buffered events that make a flush happen at once
BUFFER_LIMIT = 50
#: how long an event may wait in the buffer: one message carries every phase that ended meanwhile,
#: in every build of the process (a short build's phases cost no message of their own)
FLUSH_AFTER_S = 10.0


class PhaseEvents:
    """This process's buffered phase events (one instance per process and app, made by the
    worker's runtime). Thread-safe."""

    def __init__(self, app: Celery, scheduler: Scheduler) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._dispatchers: dict[str, Any] = {}
        # one periodic flush for the process (sending nothing while nothing is buffered), so a
        # build's events cost no scheduling of their own
        scheduler.every(FLUSH_AFTER_S, self.flush)

    def send(self, hostname: str, **fields: Any) -> None:
        """Buffer one ``buildq-phase`` event from worker ``hostname``; it is out within FLUSH_AFTER_S."""
        with self._lock:
            self._dispatcher(hostname).send(PHASE_EVENT, **fields)  # publishes past BUFFER_LIMIT

    def send_now(self, hostname: str, event_type: str, **fields: Any) -> None:
        """Publish one event of another type at once (daemon up/down), with what is buffered."""
        with self._lock:
            dispatcher = self._dispatcher(hostname)
            dispatcher.send(event_type, **fields)
            dispatcher.flush()

    def flush(self) -> None:
        """Publish everything buffered now (errors are logged: events are best effort)."""
        with self._lock:
            for hostname, dispatcher in list(self._dispatchers.items()):
                try:
                    dispatcher.flush()  # nothing buffered: nothing sent
                except Exception as exc:  # noqa: BLE001 - the broker is away; make a new one next time
                    self._dispatchers.pop(hostname, None)
                    log.warning("phase events not published: %s", exc)

    def _dispatcher(self, hostname: str) -> Any:
        dispatcher = self._dispatchers.get(hostname)
        if dispatcher is None:
            dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(),
                hostname=hostname,
                enabled=True,
                buffer_group=[PHASE_EVENT.split("-", 1)[0]],
                buffer_limit=BUFFER_LIMIT,
            )
            self._dispatchers[hostname] = dispatcher
        return dispatcher
