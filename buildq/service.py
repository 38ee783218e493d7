"""What a worker does with one delivered build message, apart from Celery.

:class:`BuildService.handle` validates the job, makes sure only one ``buildctl`` runs per job id
(a lease in Redis), runs one attempt, and decides: store the final record, or ask for a retry
after a backoff (the Celery task turns :class:`RetryLater` into ``self.retry``).
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
from .config import Settings
from .errors import BuildError, InvalidJobError
from .jobs import BuildJob, parse_job
from .launchers.base import Launcher
from .logs import AttemptLog, LogStore
from .metrics import BuildMetrics
from .records import attempt_record, error_record, final_record
from .redact import Redactor
from .runner import AttemptOutcome, check_job_on_worker, run_attempt
from .state import JobStore

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
    """Where live progress goes (the Celery task sends events and updates its state); no-op here."""

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
    metrics: BuildMetrics | None = None
    logs: LogStore | None = None
    slots: DaemonSlots | None = None
    #: how long a delivery polls for a daemon slot before it re-queues itself
    slot_wait_s: float = 5.0
    rand: Callable[[], float] | None = None
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
        """Process one delivery; return the final record or raise RetryLater / LeaseLost."""
        reporter = reporter or Reporter()
        now = self.clock()
        enqueued = enqueued_at if enqueued_at is not None else now
        attempts = list(attempts or [])
        try:
            job = parse_job(message)
        except InvalidJobError as exc:
            return self._reject(message, task_id, exc, enqueued, attempts)
        try:
            check_job_on_worker(job, environ=self.environ, max_timeout_s=self.settings.max_timeout_s)
        except InvalidJobError as exc:
            return self._reject(job, task_id, exc, enqueued, attempts)

        token = self.store.new_token()
        pre = self._claim(job.job_id, token)
        if pre is not None:
            return pre
        try:
            return self._run_claimed(job, token, enqueued, attempts, reporter)
        finally:
            self.store.release_lease(job.job_id, token)

    # ----------------------------------------------------------------------------------------
    def _claim(self, job_id: str, token: str) -> dict[str, Any] | None:
        """Take the job's lease, or return the record some other delivery produced."""
        ttl = self.settings.lease_ttl_s
        deadline = self.clock() + self.settings.max_timeout_s + ttl
        while True:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.get(f"buildq:result:{job_id}")
            pipe.set(f"buildq:lease:{job_id}", token, nx=True, px=max(1, int(ttl * 1000)))
            pipe.hget(f"buildq:job:{job_id}", "state")
            existing, acquired, previous_state = pipe.execute()
            if existing:
                if acquired:
                    self.store.release_lease(job_id, token)
                import json

                return dict(json.loads(existing))
            if acquired:
                if previous_state in (b"running",):
                    # a previous delivery died mid-build: its buildctl may still be running
                    self._kill_orphan(job_id)
                return None
            if self.clock() > deadline:
                raise LeaseLost(f"job {job_id} is held by another worker for too long")
            time.sleep(self.duplicate_poll_s)

    def _kill_orphan(self, job_id: str) -> None:
        try:
            self.launcher.kill_orphan(job_id)
        except Exception:  # noqa: BLE001 - best effort, the build goes on
            pass

    def _run_claimed(
        self, job: BuildJob, token: str, enqueued: float, attempts: list[dict[str, Any]], reporter: Reporter
    ) -> dict[str, Any]:
        window_start = attempts[-1]["window_end"] if attempts else enqueued
        number = len(attempts) + 1
        if self.store.cancel_requested(job.job_id):
            return self._finish_cancelled_before_start(
                job, enqueued, attempts, window_start, number, reporter
            )

        daemon = self._take_daemon(job, token, number)
        try:
            return self._run_on(job, token, enqueued, attempts, reporter, daemon, window_start, number)
        finally:
            if self.slots is not None:
                self.slots.release(daemon, token)

    def _take_daemon(self, job: BuildJob, token: str, number: int) -> str:
        """A daemon with a free slot (held under ``token``); raise WaitForDaemon when all stay full."""
        daemons = self.settings.daemons
        prefer = zlib.crc32(job.job_id.encode()) + number - 1  # spread jobs; move on at a retry
        if self.slots is None:
            return daemons[prefer % len(daemons)]
        daemon = wait_for_slot(
            self.slots,
            daemons,
            token,
            self.settings.lease_ttl_s,
            self.settings.buildkit_max_builds,
            max_wait_s=self.slot_wait_s,
            prefer=prefer,
        )
        if daemon is None:
            self.store.update(job.job_id, state="queued", phase="waiting_for_daemon")
            raise WaitForDaemon(countdown=1.0 + (self.rand or random.random)() * 2.0)
        return daemon

    def _run_on(
        self,
        job: BuildJob,
        token: str,
        enqueued: float,
        attempts: list[dict[str, Any]],
        reporter: Reporter,
        daemon: str,
        window_start: float,
        number: int,
    ) -> dict[str, Any]:
        started = self.clock()
        self.store.update(job.job_id, state="running", attempt=number, worker=self.worker_id, phase="launch")
        reporter.phase_ended(job.job_id, number, "queued", max(0.0, started - window_start))
        reporter.phase_started(job.job_id, number, "launch")
        live = LivePhases(self.clock, started)
        log = self._attempt_log(job, number)

        def on_line(line: str, status: SolveStatus | None) -> None:
            if log is not None:
                log.feed(line, status)
            ended = live.on_output(status)
            if ended:
                for phase, seconds in ended:
                    reporter.phase_ended(job.job_id, number, phase, seconds)
                reporter.phase_started(job.job_id, number, live.current)

        stopper = _Stopper(
            self.store, job.job_id, token, self.settings.lease_ttl_s, self.clock, self.slots, daemon
        )
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
                clock=self.clock,
                on_line=on_line,
                should_stop=stopper,
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
        reporter.phase_started(job.job_id, number, "finalize")
        if outcome.outcome == "lease_lost":
            if log is not None:
                log.close()
            raise LeaseLost(f"lost the lease of job {job.job_id} while building")
        return self._conclude(job, outcome, enqueued, attempts, window_start, reporter, log)

    def _attempt_log(self, job: BuildJob, number: int) -> AttemptLog | None:
        if self.logs is None:
            return None
        secrets = [self.environ[s.env] for s in job.secrets if s.env in self.environ]
        secrets += [self.environ[name] for name in self.settings.redact_env if name in self.environ]
        log = AttemptLog(self.logs, job.job_id, number, redactor=Redactor(secrets) if secrets else None)
        self.logs.mark(job.job_id, number, f"attempt {number} started on {self.worker_id}")
        return log

    def _conclude(
        self,
        job: BuildJob,
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
        if self.metrics is not None and outcome.daemon:  # an attempt that reached the launcher
            self.metrics.attempt_finished(record)
        if retry:
            assert failure is not None
            delay = backoff_delay(
                outcome.number,
                base=self.settings.retry_backoff_base_s,
                cap=self.settings.retry_backoff_cap_s,
                **({"rand": self.rand} if self.rand is not None else {}),
            )
            if log is not None:
                log.close()
                log.store.mark(
                    job.job_id,
                    outcome.number,
                    f"attempt {outcome.number} failed ({failure.reason}); retrying in {delay:.2f}s",
                )
            self.store.update(job.job_id, state="queued", phase="retry_wait")
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
        if log is not None:
            log.close(final_state=state)
        self.store.store_result(job.job_id, final)
        reporter.phase_ended(
            job.job_id, outcome.number, "finalize", max(0.0, self.clock() - outcome.exited_at)
        )
        if self.metrics is not None:
            self.metrics.build_finished(final)
        return final

    def _finish_cancelled_before_start(
        self,
        job: BuildJob,
        enqueued: float,
        attempts: list[dict[str, Any]],
        window_start: float,
        number: int,
        reporter: Reporter,
    ) -> dict[str, Any]:
        now = self.clock()
        outcome = AttemptOutcome(
            number,
            "",
            now,
            now,
            "cancelled",
            failure=Failure(transient=False, reason="cancelled", message="build cancelled before it started"),
        )
        if self.logs is not None:
            self.logs.mark(job.job_id, number, "final: cancelled (before it started)")
        return self._conclude(job, outcome, enqueued, attempts, window_start, reporter)

    def _reject(
        self,
        message: Any,
        task_id: str | None,
        exc: BuildError,
        enqueued: float,
        attempts: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """An invalid job: a failed record naming the field; buildctl is never launched."""
        job_id = (
            message.job_id
            if isinstance(message, BuildJob)
            else (message.get("job_id") if isinstance(message, dict) else None)
        )
        if not isinstance(job_id, str) or not job_id:
            job_id = task_id or "unknown"
        now = self.clock()
        field_name = getattr(exc, "field", "job")
        record = {
            "job_id": job_id,
            "state": "failed",
            "image": None,
            "cache": None,
            "enqueued_at": None,
            "started_at": None,
            "finished_at": None,
            "duration_s": 0.0,
            "attempts": attempts,
            "error": error_record("invalid", "invalid_job", exc.message, field=field_name),
            "phases": None,
            "steps": None,
            "slowest_steps": [],
        }
        from .records import iso

        record["enqueued_at"], record["finished_at"] = iso(enqueued), iso(now)
        if job_id != "unknown":
            self.store.store_result(job_id, record)
        if self.metrics is not None:
            self.metrics.build_finished(record)
        return record


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


class _Stopper:
    """``should_stop`` for the runner: cancellation flag, lease and daemon-slot renewal (watcher thread)."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: str,
        lease_ttl_s: float,
        clock: Clock,
        slots: DaemonSlots | None = None,
        daemon: str = "",
    ) -> None:
        self.store, self.job_id, self.token, self.ttl, self.clock = store, job_id, token, lease_ttl_s, clock
        self.slots, self.daemon = slots, daemon
        self.next_renewal = clock() + lease_ttl_s / 3
        self.lock = threading.Lock()

    def __call__(self) -> str | None:
        with self.lock:
            try:
                if self.store.cancel_requested(self.job_id):
                    return "cancelled"
                if self.clock() >= self.next_renewal:
                    if not self.store.renew_lease(self.job_id, self.token, self.ttl):
                        return "lease_lost"
                    if self.slots is not None:
                        self.slots.renew(self.daemon, self.token, self.ttl)
                    self.next_renewal = self.clock() + self.ttl / 3
            except Exception:  # noqa: BLE001 - Redis blip: keep building, try again next tick
                return None
            return None
