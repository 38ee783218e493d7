"""One claimed attempt of a build: run buildctl, then store the final record or ask for a retry.

:class:`Attempt` is the context of the attempt (job, number, lease token, daemon slot, its time
window, the attempts before it, where progress goes). :class:`AttemptRun` runs it: buildctl through
the launcher with the build's watcher on the process's ticker (cancel flag, deadline, lease and
slot renewal), then hands the outcome to :class:`~buildq.engine.ending.AttemptEnd`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..buildkit.livephase import LivePhases
from ..buildkit.solvestatus import SolveStatus
from ..contract.job import BuildJob, url_query_values
from ..records import epoch
from ..store.claim import Holder
from .attemptlog import AttemptLog
from .ending import AttemptEnd
from .interface import LeaseLost, Reporter
from .redact import Redactor
from .runner import run_attempt

if TYPE_CHECKING:
    from .service import BuildService


@dataclass
class Attempt:
    """A claimed attempt. ``window_start`` is the enqueue, or the end of the previous attempt (so a
    retry's backoff counts as queued time); ``started_at`` is when its buildctl was started;
    ``released`` turns true once the result transaction gave the lease and the slot back."""

    job: BuildJob
    number: int
    token: str
    daemon: str | None
    enqueued_at: float
    window_start: float
    earlier: list[dict[str, Any]]
    reporter: Reporter
    released: bool = False
    started_at: float | None = None

    def build_started_at(self) -> float | None:
        """When the build started: its first attempt's start (this one's, for a first attempt)."""
        first = epoch(self.earlier[0].get("started_at")) if self.earlier else None
        return first or self.started_at

    #: why ``daemon`` (affinity | least_loaded | fallback, :func:`~buildq.records.routing_reason`)
    routing: str | None = None


def job_redactor(values: list[str], redactor: Redactor | None, job: BuildJob) -> Redactor | None:
    """The process's ``redactor`` (of ``values``), plus the query string of the job's URL context
    (a presigned URL's token) when it has one."""
    extra = url_query_values(job.context)
    return Redactor([*values, *extra]) if extra else redactor


class AttemptRun:
    """Runs one :class:`Attempt` with the process's runtime (``service``)."""

    def __init__(self, service: BuildService, attempt: Attempt) -> None:
        self.service, self.attempt = service, attempt
        # every granted secret and BUILDQ_REDACT_ENV value, and a URL context's query string
        self.redactor = job_redactor(service.redact_values, service.redactor, attempt.job)
        self.end = AttemptEnd(service, attempt, self.redactor)

    def run(self) -> dict[str, Any]:
        """buildctl once; the final record, or RetryLater / LeaseLost."""
        s, a = self.service, self.attempt
        job_id, number, reporter = a.job.job_id, a.number, a.reporter
        assert a.daemon is not None
        a.started_at = s.clock()  # the same start in the running job hash and in the record
        live = LivePhases(s.clock, a.started_at)
        log = self._attempt_log()
        current = _CurrentPhase(self)
        holder = Holder(s.store, job_id, a.token, s.settings.lease_ttl_s, s.clock, s.slots, a.daemon)

        def on_start() -> None:  # buildctl is running: events go out off the critical path
            reporter.phase_ended(job_id, number, "queued", max(0.0, live.since - a.window_start))

        def on_line(line: str, status: SolveStatus | None) -> None:
            if log is not None:
                log.feed(line, status)
            ended = live.on_output(status)
            if ended:
                for phase, seconds in ended:
                    reporter.phase_ended(job_id, number, phase, seconds)
                current.set(live.current)

        def should_stop() -> str | None:  # on the ticker thread, every 250 ms from the start
            current.go_live()
            return holder()

        with s.metrics.running():
            try:
                outcome = run_attempt(
                    a.job,
                    number=number,
                    launcher=s.launcher,
                    daemon=a.daemon,
                    insecure_registries=s.settings.insecure_registries,
                    environ=s.environ,
                    timeout_s=float(a.job.timeout_s or s.settings.default_timeout_s),
                    ticker=s.ticker,
                    clock=s.clock,
                    on_start=on_start,
                    on_line=on_line,
                    should_stop=should_stop,
                    extra_transient=s.settings.transient_patterns,
                    started_at=a.started_at,
                )
            except BaseException:
                if log is not None:
                    log.close()
                raise
            for phase, seconds in live.finish():
                reporter.phase_ended(job_id, number, phase, seconds)
            if outcome.outcome == "lease_lost":
                if log is not None:
                    log.close()
                raise LeaseLost(f"lost the lease of job {job_id} while building")
            return self.end.conclude(outcome, log)

    def mark_running(self) -> None:
        """The job hash says ``running`` on this worker and daemon, since the build's start (unless
        the result is already stored)."""
        a = self.attempt
        if not a.reporter.done:
            started = a.build_started_at()
            running = {"state": "running", "attempt": a.number, "worker": self.service.worker_id}
            where = {"daemon": a.daemon or "", "started_at": repr(started) if started else ""}
            self.service.store.update(a.job.job_id, running, **where)

    def _attempt_log(self) -> AttemptLog | None:
        s, a = self.service, self.attempt
        if s.logs is None:
            return None
        log = AttemptLog(s.logs, a.job.job_id, a.number, redactor=self.redactor)
        log.mark(f"attempt {a.number} started on {s.worker_id}")
        return log


class _CurrentPhase:
    """The running build's current phase (task state ``BUILDING``, job hash), published from the
    watcher's first tick on: a build that ends within 250 ms never shows a stale running state,
    and costs no progress writes."""

    def __init__(self, run: AttemptRun) -> None:
        self.run = run
        self.phase = "launch"
        self.live = False
        self.lock = threading.Lock()

    def set(self, phase: str) -> None:
        with self.lock:
            self.phase = phase
            if self.live:
                a = self.run.attempt
                a.reporter.phase_started(a.job.job_id, a.number, phase)

    def go_live(self) -> None:
        if self.live:
            return
        with self.lock:
            self.live = True
            a = self.run.attempt
            self.run.service.side.submit(self.run.mark_running)
            a.reporter.phase_started(a.job.job_id, a.number, self.phase)
