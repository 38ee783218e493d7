"""The end of a claimed attempt: store the final record, or ask for a retry.

:meth:`AttemptEnd.conclude` decides from the attempt's outcome: a transient failure with attempts
left raises ``RetryLater`` (at once when the daemon was never reached, else after the backoff); any
other outcome becomes the final record, stored with the log's end and the claim given back in one
round trip (:func:`~buildq.store.claim.finish`). The record's ``explain`` compares its phases with
the repository's baseline (:mod:`buildq.engine.explain`), read first only when a phase or step took long
enough to be flagged; a build that succeeded in one attempt joins the baseline in that round trip.
A daemon that could not be dialled has its circuit breaker opened here. :meth:`AttemptEnd.give_up`
and :meth:`AttemptEnd.cancelled_before_start` end a job that never ran.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..buildkit.classify import Failure
from ..contract.job import cache_key
from ..records import (
    AttemptOutcome,
    attempt_record,
    build_cache_evidence,
    counts_as_attempt,
    error_record,
    final_record,
    outcome_state,
    redact_strings,
    unreached_since,
)
from ..store.baseline import BaselineWrite, baseline_write, read_baseline
from ..store.claim import finish
from .attemptlog import AttemptLog
from .backoff import backoff_delay
from .explain import baseline_entry, explain, needs_baseline
from .interface import LeaseLost, RetryLater
from .redact import Redactor
from .unavailable import unavailable_message

if TYPE_CHECKING:
    from .attempt import Attempt
    from .service import BuildService

logger = logging.getLogger("buildq.engine")


class AttemptEnd:
    """Ends one :class:`~buildq.engine.attempt.Attempt` with the process's runtime (``service``)."""

    def __init__(self, service: BuildService, attempt: Attempt, redactor: Redactor | None) -> None:
        self.service, self.attempt, self.redactor = service, attempt, redactor

    def cancelled_before_start(self) -> dict[str, Any]:
        """The job was cancelled while queued: a cancelled record, buildctl never launched."""
        s, a = self.service, self.attempt
        now = s.clock()
        message = "build cancelled before it started"
        failure = Failure(transient=False, reason="cancelled", message=message)
        outcome = AttemptOutcome(a.number, "", now, now, "cancelled", failure=failure)
        if s.logs is not None:
            s.logs.mark(a.job.job_id, a.number, "final: cancelled (before it started)")
        return self.conclude(outcome)

    def conclude(self, outcome: AttemptOutcome, log: AttemptLog | None = None) -> dict[str, Any]:
        """Store the final record (one round trip), or raise RetryLater for a transient failure."""
        s, a = self.service, self.attempt
        job_id = a.job.job_id
        failure = outcome.failure
        if failure is not None and self.redactor is not None:  # buildctl's words may quote a secret
            failure = outcome.failure = replace(failure, message=self.redactor(failure.message))
        now = s.clock()
        if outcome.daemon:
            outcome.routing = a.routing
        # secrets are masked wherever a record goes: the result, the retry message, Celery's result
        record = self._redact(attempt_record(outcome, window_start=a.window_start, window_end=now))
        attempts = [*a.earlier, record]
        counted = sum(1 for r in attempts if counts_as_attempt(r))
        uncounted = not counts_as_attempt(record)  # never reached its daemon: try another one at once
        if uncounted and outcome.daemon:  # the daemon does not answer: open its circuit breaker
            assert failure is not None
            self._daemon_down(outcome.daemon, failure.message)
        if uncounted and now - (unreached_since(attempts) or now) >= s.settings.daemon_wait_s:
            # no daemon could be dialled for BUILDQ_DAEMON_WAIT_S: give up, naming them
            message = unavailable_message(s.daemons, s.settings, now)
            if log is not None:
                log.close()
            return self.give_up("daemon_unavailable", message, attempts)
        retry = (
            failure is not None
            and failure.transient
            and outcome.outcome == "failed"
            and (uncounted or counted < s.settings.retry_max_attempts)
            and not s.store.cancel_requested(job_id)
        )
        launched = bool(outcome.daemon)  # metrics count attempts that reached the launcher
        if retry:
            assert failure is not None
            if launched:
                s.metrics.attempt_finished(record)
            delay = 0.0
            if not uncounted:
                delay = backoff_delay(
                    counted,
                    base=s.settings.retry_backoff_base_s,
                    cap=s.settings.retry_backoff_cap_s,
                    **({"rand": s.rand} if s.rand is not None else {}),
                )
            if log is not None:
                log.mark(f"attempt {outcome.number} failed ({failure.reason}); retrying in {delay:.2f}s")
                log.close()
            s.store.update(job_id, {"state": "queued", "phase": "retry_wait"})
            raise RetryLater(countdown=delay, attempts=attempts, reason=failure.reason, window_end=now)
        state, error = outcome_state(outcome)
        if error is not None and log is not None:
            tail = log.failing_tail(30)
            if tail:
                error["log_tail"] = tail
        cache = build_cache_evidence(a.job, outcome, state)
        final = self._redact(final_record(
            a.job, state=state, attempts=attempts, last=outcome, enqueued_at=a.enqueued_at, finished_at=now,
            error=error, worker=s.worker_id, cache=cache,
        ))  # fmt: skip
        self._store(final, log, self._explain(final))
        a.reporter.phase_ended(job_id, outcome.number, "finalize", max(0.0, s.clock() - outcome.exited_at))
        if launched:
            s.metrics.attempt_finished(record)
        s.metrics.build_finished(final)
        if cache.export_outcome is not None:
            s.metrics.cache_export(cache.export_outcome)
        return final

    def give_up(
        self, kind: str, message: str, attempts: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Fail the job without another attempt (e.g. no daemon came back): a failed record."""
        s, a = self.service, self.attempt
        error = error_record(kind, kind, message)
        final = self._redact(final_record(
            a.job, state="failed", attempts=a.earlier if attempts is None else attempts, last=None,
            enqueued_at=a.enqueued_at, finished_at=s.clock(), error=error, worker=s.worker_id,
        ))  # fmt: skip
        if s.logs is not None:
            s.logs.mark(a.job.job_id, a.number, f"{kind}: {message}")
        self._store(final, None)
        s.metrics.build_finished(final)
        return final

    def _redact(self, record: dict[str, Any]) -> dict[str, Any]:
        return redact_strings(record, self.redactor.redact if self.redactor is not None else None)

    def _explain(self, final: dict[str, Any]) -> BaselineWrite | None:
        """Fill in ``final["explain"]``; return what the build adds to its repository's baseline."""
        s = self.service
        phases, steps, key = final["phases"], final["slowest_steps"], cache_key(self.attempt.job)
        n = s.settings.baseline_n
        baseline = read_baseline(s.store.redis, key, n) if phases and needs_baseline(phases, steps) else None
        final["explain"] = explain(phases, steps, baseline, key=key)
        return baseline_write(key, baseline_entry(final), n)

    def _store(
        self, final: dict[str, Any], log: AttemptLog | None, baseline: BaselineWrite | None = None
    ) -> None:
        """One round trip: the log's end, the result, the final state, the lease and slot given back
        (and the build's entry in its repository's baseline, its daemon remembered for its cache)."""
        s, a = self.service, self.attempt
        entries = log.drain(final["state"]) if log is not None else ()
        remember = cache_key(a.job) if s.settings.cache_affinity else None  # a success: its daemon
        stored = finish(
            s.store, s.slots, a.job.job_id, a.token, a.daemon, final, logs=s.logs, log_entries=entries,
            remember=remember, baseline=baseline,
        )  # fmt: skip
        a.released = True
        a.reporter.done = True
        if not stored:  # a stale holder: another delivery owns the job, its record stands
            logger.warning("job %s: result of a delivery that lost its lease dropped", a.job.job_id)
            raise LeaseLost(f"lost the lease of job {a.job.job_id}; result dropped")

    def _daemon_down(self, daemon: str, error: str) -> None:
        """Open the daemon's circuit breaker; the worker that opened it says so (once per outage)."""
        s = self.service
        if self.redactor is not None:
            error = self.redactor(error)
        if s.daemons is not None and s.daemons.mark_down(daemon, error, s.clock()):
            logger.warning("BuildKit daemon %s is down: %s", daemon, error)
            self.attempt.reporter.daemon_down(daemon, error)
