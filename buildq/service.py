"""What a worker does with one delivered build message, apart from Celery.

:meth:`BuildService.handle` validates the job, claims it (lease, cancel flag, daemon slot: one
round trip), runs one attempt, and decides: store the final record with the log's end and give
the claim back (:func:`~buildq.claim.finish`, one round trip), or ask for a retry after a backoff
(the Celery task turns :class:`RetryLater` into ``self.retry``). Only what must precede buildctl's
start or the stored result sits on those paths; live progress goes through the process's
:class:`~buildq.sidechannel.SideChannel`, and the build's watcher runs on its
:class:`~buildq.ticker.Ticker`.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .buildkit.backoff import backoff_delay
from .buildkit.classify import Failure
from .buildkit.livephase import LivePhases
from .buildkit.solvestatus import SolveStatus
from .capacity import DaemonSlots, wait_for_slot
from .claim import Holder, claim, finish, release
from .config import Settings
from .errors import BuildError, InvalidJobError
from .jobs import BuildJob, parse_job
from .launchers.base import Launcher
from .logs import AttemptLog, LogStore
from .metrics import BuildMetrics
from .records import attempt_record, error_record, final_record, iso
from .redact import Redactor
from .runner import WATCH_INTERVAL_S, AttemptOutcome, check_job_on_worker, run_attempt
from .sidechannel import SideChannel
from .state import JobStore
from .ticker import Ticker

Clock = Callable[[], float]


@dataclass
class RetryLater(Exception):
    """Run the job again in ``countdown`` seconds, carrying the attempts so far."""

    countdown: float
    attempts: list[dict[str, Any]]
    reason: str


class WaitForDaemon(Exception):
    """Every daemon is at its cap: re-queue this delivery (no attempt used) in ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"all BuildKit daemons are busy; re-queued for {countdown:.1f}s")
        self.countdown = countdown


class LeaseLost(Exception):
    """Another worker owns this job now; this delivery must not store anything."""


class Reporter:
    """Where live progress goes (the Celery task sends events and updates its state); no-op here.

    Called from the build's own thread; implementations hand the I/O to the side channel.
    ``done`` turns true once the result is stored: progress still queued then is stale.
    """

    def __init__(self) -> None:
        self.done = False

    def phase_started(self, job_id: str, attempt: int, phase: str) -> None:
        """The build entered ``phase`` (shown as the task's current state)."""

    def phase_ended(self, job_id: str, attempt: int, phase: str, seconds: float) -> None:
        """``phase`` ended after ``seconds`` (a ``task-phase`` event)."""


@dataclass
class BuildService:
    """Per-process build runtime: settings, launcher, store and clock, built once."""

    settings: Settings
    launcher: Launcher
    store: JobStore
    clock: Clock = time.time
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    rand: Callable[[], float] | None = None
    metrics: BuildMetrics | None = None
    logs: LogStore | None = None
    slots: DaemonSlots | None = None
    side: SideChannel = field(default_factory=SideChannel)
    ticker: Ticker = field(default_factory=lambda: Ticker(WATCH_INTERVAL_S))
    #: how long a delivery polls for a daemon slot before it re-queues itself
    slot_wait_s: float = 5.0
    #: seconds between polls while waiting for another worker's lease on the same job
    duplicate_poll_s: float = 0.5

    def __post_init__(self) -> None:
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    # ----------------------------------------------------------------------------------------
    def handle(
        self,
        message: Any,
        *,
        enqueued_at: float | None,
        attempts: list[dict[str, Any]] | None,
        task_id: str | None = None,
        reporter: Reporter | None = None,
    ) -> dict[str, Any]:
        """Process one delivery; return the final record or raise RetryLater / WaitForDaemon / LeaseLost."""
        try:
            return self._handle(message, enqueued_at, list(attempts or []), task_id, reporter or Reporter())
        finally:
            # progress written after the final state would make it look like the build still runs
            self.side.drain()

    def _handle(
        self,
        message: Any,
        enqueued_at: float | None,
        attempts: list[dict[str, Any]],
        task_id: str | None,
        reporter: Reporter,
    ) -> dict[str, Any]:
        enqueued = enqueued_at if enqueued_at is not None else self.clock()
        try:
            job = parse_job(message)
            check_job_on_worker(job, environ=self.environ, max_timeout_s=self.settings.max_timeout_s)
        except InvalidJobError as exc:
            return self._reject(message, task_id, exc, enqueued, attempts)

        number = len(attempts) + 1
        token = self.store.new_token()
        prefer = zlib.crc32(job.job_id.encode()) + number - 1  # spread jobs; move on at a retry
        try:
            got = claim(
                self.store,
                self.slots,
                job.job_id,
                token,
                daemons=self.settings.daemons,
                limit=self.settings.buildkit_max_builds,
                ttl_s=self.settings.lease_ttl_s,
                prefer=prefer,
                give_up_after_s=self.settings.max_timeout_s + self.settings.lease_ttl_s,
                poll_s=self.duplicate_poll_s,
                clock=self.clock,
            )
        except TimeoutError as exc:
            raise LeaseLost(str(exc)) from None
        if got.record is not None:
            return got.record
        hold = _Hold(token, got.daemon)
        try:
            if got.claimed_before:
                # a retry, or an earlier delivery that died mid-build: its buildctl may still run
                self._kill_orphan(job.job_id)
            window_start = attempts[-1]["window_end"] if attempts else enqueued
            if got.cancelled:
                return self._cancelled_before_start(
                    job, hold, enqueued, attempts, window_start, number, reporter
                )
            if hold.daemon is None:
                hold.daemon = self._wait_for_daemon(job, token, prefer)
            return self._run(job, hold, enqueued, attempts, window_start, number, reporter)
        finally:
            if not hold.released:  # a retry or an error: the result transaction did not release it
                release(self.store, self.slots, job.job_id, token, hold.daemon)

    def _wait_for_daemon(self, job: BuildJob, token: str, prefer: int) -> str:
        assert self.slots is not None
        daemon = wait_for_slot(
            self.slots,
            self.settings.daemons,
            token,
            self.settings.lease_ttl_s,
            self.settings.buildkit_max_builds,
            prefer=prefer,
            max_wait_s=self.slot_wait_s,
        )
        if daemon is None:
            self.store.update(job.job_id, state="queued", phase="waiting_for_daemon")
            raise WaitForDaemon(countdown=1.0 + (self.rand or random.random)() * 2.0)
        return daemon

    def _kill_orphan(self, job_id: str) -> None:
        try:
            self.launcher.kill_orphan(job_id)
        except Exception:  # noqa: BLE001 - best effort, the build goes on
            pass

    # ----------------------------------------------------------------------------------------
    def _run(
        self,
        job: BuildJob,
        hold: _Hold,
        enqueued: float,
        attempts: list[dict[str, Any]],
        window_start: float,
        number: int,
        reporter: Reporter,
    ) -> dict[str, Any]:
        live = LivePhases(self.clock, self.clock())
        log = self._attempt_log(job, number)

        current = _CurrentPhase(self, reporter, job.job_id, number)
        daemon = hold.daemon
        assert daemon is not None
        holder = Holder(
            self.store, job.job_id, hold.token, self.settings.lease_ttl_s, self.clock, self.slots, daemon
        )

        def on_start() -> None:  # buildctl is running: events go out off the critical path
            reporter.phase_ended(job.job_id, number, "queued", max(0.0, live.since - window_start))

        def on_line(line: str, status: SolveStatus | None) -> None:
            if log is not None:
                log.feed(line, status)
            ended = live.on_output(status)
            if ended:
                for phase, seconds in ended:
                    reporter.phase_ended(job.job_id, number, phase, seconds)
                current.set(live.current)

        def should_stop() -> str | None:  # on the ticker thread, every 250 ms from the start
            current.go_live()
            return holder()

        if self.metrics is not None:
            self.metrics.attempt_started()
        try:
            outcome = run_attempt(
                job,
                number=number,
                launcher=self.launcher,
                daemon=daemon,
                insecure_registries=self.settings.insecure_registries,
                environ=self.environ,
                timeout_s=float(job.timeout_s or self.settings.default_timeout_s),
                ticker=self.ticker,
                clock=self.clock,
                on_start=on_start,
                on_line=on_line,
                should_stop=should_stop,
                extra_transient=self.settings.transient_patterns,
            )
        except BaseException:
            if log is not None:
                log.close()
            if self.metrics is not None:
                self.metrics.in_progress.dec()
            raise
        for phase, seconds in live.finish():
            reporter.phase_ended(job.job_id, number, phase, seconds)
        if outcome.outcome == "lease_lost":
            if log is not None:
                log.close()
            raise LeaseLost(f"lost the lease of job {job.job_id} while building")
        return self._conclude(job, hold, outcome, enqueued, attempts, window_start, reporter, log)

    def _mark_running(self, reporter: Reporter, job_id: str, number: int) -> None:
        if not reporter.done:
            self.store.update(job_id, {"state": "running", "attempt": number, "worker": self.worker_id})

    def _attempt_log(self, job: BuildJob, number: int) -> AttemptLog | None:
        if self.logs is None:
            return None
        secrets = [self.environ[s.env] for s in job.secrets if s.env in self.environ]
        secrets += [self.environ[name] for name in self.settings.redact_env if name in self.environ]
        log = AttemptLog(self.logs, job.job_id, number, redactor=Redactor(secrets) if secrets else None)
        log.mark(f"attempt {number} started on {self.worker_id}")
        return log

    def _conclude(
        self,
        job: BuildJob,
        hold: _Hold,
        outcome: AttemptOutcome,
        enqueued: float,
        attempts: list[dict[str, Any]],
        window_start: float,
        reporter: Reporter,
        log: AttemptLog | None = None,
    ) -> dict[str, Any]:
        failure = outcome.failure
        retry = (
            failure is not None
            and failure.transient
            and outcome.outcome == "failed"
            and outcome.number < self.settings.retry_max_attempts
            and not self.store.cancel_requested(job.job_id)
        )
        now = self.clock()
        record = attempt_record(outcome, window_start=window_start, window_end=now)
        attempts = [*attempts, record]
        # counted only when it reached the launcher; a final attempt once the result is stored
        attempt_metrics = self.metrics if outcome.daemon else None
        if retry:
            assert failure is not None
            if attempt_metrics is not None:
                attempt_metrics.attempt_finished(record)
            delay = backoff_delay(
                outcome.number,
                base=self.settings.retry_backoff_base_s,
                cap=self.settings.retry_backoff_cap_s,
                **({"rand": self.rand} if self.rand is not None else {}),
            )
            if log is not None:
                log.mark(f"attempt {outcome.number} failed ({failure.reason}); retrying in {delay:.2f}s")
                log.close()
            self.store.update(job.job_id, {"state": "queued", "phase": "retry_wait"})
            raise RetryLater(countdown=delay, attempts=attempts, reason=failure.reason)
        state, error = _final_state(outcome, failure)
        if error is not None and log is not None:
            tail = log.failing_tail(30)
            if tail:
                error["log_tail"] = tail
        final = final_record(
            job,
            state=state,
            attempts=attempts,
            last=outcome,
            enqueued_at=enqueued,
            finished_at=now,
            error=error,
        )
        # one round trip: the log's end, the result, the final state, the lease and slot given back
        finish(
            self.store,
            self.slots,
            job.job_id,
            hold.token,
            hold.daemon,
            final,
            logs=self.logs,
            log_entries=log.drain(state) if log is not None else (),
        )
        hold.released = True
        reporter.done = True
        reporter.phase_ended(
            job.job_id, outcome.number, "finalize", max(0.0, self.clock() - outcome.exited_at)
        )
        if attempt_metrics is not None:
            attempt_metrics.attempt_finished(record)
        if self.metrics is not None:
            self.metrics.build_finished(final)
        return final

    def _cancelled_before_start(
        self,
        job: BuildJob,
        hold: _Hold,
        enqueued: float,
        attempts: list[dict[str, Any]],
        window_start: float,
        number: int,
        reporter: Reporter,
    ) -> dict[str, Any]:
        now = self.clock()
        message = "build cancelled before it started"
        outcome = AttemptOutcome(
            number,
            "",
            now,
            now,
            "cancelled",
            failure=Failure(transient=False, reason="cancelled", message=message),
        )
        if self.logs is not None:
            self.logs.mark(job.job_id, number, "final: cancelled (before it started)")
        return self._conclude(job, hold, outcome, enqueued, attempts, window_start, reporter)

    def _reject(
        self,
        message: Any,
        task_id: str | None,
        exc: BuildError,
        enqueued: float,
        attempts: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """An invalid job: a failed record naming the field; buildctl is never launched."""
        if isinstance(message, BuildJob):
            job_id: Any = message.job_id
        else:
            job_id = message.get("job_id") if isinstance(message, dict) else None
        if not isinstance(job_id, str) or not job_id:
            job_id = task_id or "unknown"
        record = {
            "job_id": job_id,
            "state": "failed",
            "image": None,
            "cache": None,
            "enqueued_at": iso(enqueued),
            "started_at": None,
            "finished_at": iso(self.clock()),
            "duration_s": 0.0,
            "attempts": attempts,
            "error": error_record("invalid", "invalid_job", exc.message, field=getattr(exc, "field", "job")),
            "phases": None,
            "steps": None,
            "slowest_steps": [],
        }
        if job_id != "unknown":
            self.store.store_result(job_id, record)
        if self.metrics is not None:
            self.metrics.build_finished(record)
        return record


@dataclass
class _Hold:
    """The claimed lease's token and daemon slot, and whether the result transaction gave them back."""

    token: str
    daemon: str | None
    released: bool = False


class _CurrentPhase:
    """The running build's current phase (task state ``BUILDING``, job hash), published from the
    watcher's first tick on: a build that ends within 250 ms never shows a stale running state,
    and costs no progress writes."""

    def __init__(self, service: BuildService, reporter: Reporter, job_id: str, number: int) -> None:
        self.service, self.reporter, self.job_id, self.number = service, reporter, job_id, number
        self.phase = "launch"
        self.live = False
        self.lock = threading.Lock()

    def set(self, phase: str) -> None:
        with self.lock:
            self.phase = phase
            if self.live:
                self.reporter.phase_started(self.job_id, self.number, phase)

    def go_live(self) -> None:
        if self.live:
            return
        with self.lock:
            self.live = True
            self.service.side.submit(self.service._mark_running, self.reporter, self.job_id, self.number)
            self.reporter.phase_started(self.job_id, self.number, self.phase)


def _final_state(outcome: AttemptOutcome, failure: Failure | None) -> tuple[str, dict[str, Any] | None]:
    if outcome.outcome == "succeeded":
        return "succeeded", None
    assert failure is not None
    if outcome.outcome == "cancelled":
        return "cancelled", error_record("cancelled", "cancelled", failure.message)
    if outcome.outcome == "timeout":
        return "failed", error_record("timeout", "timeout", failure.message)
    kind = "transient_exhausted" if failure.transient else "permanent"
    return "failed", error_record(kind, failure.reason, failure.message)
