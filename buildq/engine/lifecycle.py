"""A build's life on a worker, read top to bottom: what can happen, what to do about it, doing it.

1. **What happened** is data. The workers write a job's history into Redis themselves (the
   message carries only the job and a delivery id): its earlier attempts, where the next attempt's
   time window starts, since when it has waited for a daemon. A :class:`Situation` is that history
   plus what just happened to the current attempt, on the Redis server's clock.
2. **What to do** is :func:`decide`, a pure function: :class:`Done`, :class:`Retry` after a
   backoff, :class:`WaitForDaemon` off the pool, :class:`GiveUp` (no daemon came back), or
   :class:`Drop` (another delivery owns the job now: store nothing).
3. **Doing it** is :class:`Lifecycle`, one per worker process: it validates the delivered job,
   claims it (:meth:`buildq.store.jobs.JobStore.claim`), runs buildctl once
   (:func:`buildq.engine.runner.run_build`), asks :func:`decide`, builds the record
   (:mod:`buildq.engine.recording`) and applies the decision through the store, every write fenced
   by the claim's generation. Side effects (metrics, breakers, explain, affinity) are hooks
   (:mod:`buildq.engine.hooks`); live progress goes to the delivery's :class:`Progress`.

The Celery task (:mod:`buildq.celeryapp.task`) hands in a :class:`~buildq.contract.wire.Delivery`
and carries out the :class:`Ending` it gets back.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..buildkit.classify import DAEMON_LOST_REASONS, NEVER_REACHED_REASON
from ..buildkit.command import is_insecure, pushed_index
from ..buildkit.phases import LivePhases
from ..buildkit.progress import SolveStatus
from ..config import Settings
from ..contract.grants import (
    check_git_transport,
    check_not_pseudo,
    check_repositories,
    check_secrets,
    context_outside_roots,
)
from ..contract.job import (
    JOB_ID_PATTERN_RE,
    AttestationPolicy,
    BuildJob,
    cache_key,
    cache_refs,
    context_secrets,
    effective_attestations,
    parse_job,
)
from ..contract.record import summary, validated_record
from ..contract.status import job_id_time
from ..contract.wire import Delivery, next_message
from ..errors import InvalidJobError, RedisUnavailable
from ..launchers.base import Launcher
from ..registry import RegistryReader, RegistryReadError, read_pushed
from ..store.archive import Archive, ArchiveError
from ..store.daemons import DaemonHealth
from ..store.jobs import Claimed, ExportRelease, Fence, Finished, History, JobStore, LogEnd, NotOurs
from ..store.keys import BASELINE_PREFIX, DOMAINS, job_key
from ..store.logs import FINAL_PREFIX, FLUSH_EVERY_S, Entry, LogStore, encode_lines
from . import recording
from .attemptlog import AttemptLog
from .backoff import backoff_ceiling
from .hooks import EndWrites, Hooks
from .recording import CacheUse
from .redact import Redactor
from .runner import CANCELLED, FENCED, CachePlan, Outcome, RunRegistry, RunSpec, Stopper, Watch, run_build
from .scheduler import Handle, Scheduler

logger = logging.getLogger("buildq.engine")

#: a takeover of a job last run on another host waits at most a lease and this long for that run
#: to be known dead (the host's reaper checks every second)
TAKEOVER_SLACK_S = 3.0

# -- 1. what happened --------------------------------------------------------------------------

#: the outcomes of an attempt that never launched buildctl
NO_DAEMON_BUSY, NO_DAEMON_DOWN, CANCELLED_BEFORE_START = "no_daemon_busy", "no_daemon_down", "not_started"
#: the claim found the previous claim's attempt lost (its worker died mid-build); nothing ran yet
LOST = "lost"


@dataclass(frozen=True)
class Situation:
    """What :func:`decide` looks at. ``history``: the attempts before this one; ``outcome``: this
    attempt's (succeeded | failed | cancelled | timeout | lease_lost) or why none launched
    (:data:`NO_DAEMON_BUSY`, :data:`NO_DAEMON_DOWN`, :data:`CANCELLED_BEFORE_START`, or :data:`LOST`:
    the last entry of ``history`` is an attempt whose worker died, and none ran since). Times are
    epoch seconds on the server clock."""

    history: tuple[dict[str, Any], ...]
    outcome: str
    now: float
    transient: bool = False
    reason: str | None = None
    reached_daemon: bool = True
    #: when this attempt started (its entry's ``started_at``)
    started_at: float | None = None
    #: since when every daemon has been down for this job (None: not waiting for that)
    waiting_since: float | None = None
    #: a cancel was asked for while the attempt ran
    cancel_requested: bool = False


# -- 2. what to do -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """Store the final record: ``state`` succeeded | failed | cancelled."""

    state: str


@dataclass(frozen=True)
class Retry:
    """Run another attempt in ``delay`` seconds; ``avoid_daemon``: prefer another daemon (this one
    dropped the build)."""

    delay: float
    reason: str
    avoid_daemon: bool = False


@dataclass(frozen=True)
class WaitForDaemon:
    """No daemon can take the build: back to the queue for ``delay`` s, no attempt used.
    ``waiting_since`` is set while every daemon is down (the wait ``BUILDQ_DAEMON_WAIT_S`` bounds)."""

    delay: float
    waiting_since: float | None = None


@dataclass(frozen=True)
class GiveUp:
    """Fail the job without another attempt: no BuildKit daemon answered within the wait."""

    kind: str = "daemon_unavailable"


@dataclass(frozen=True)
class Drop:
    """Another delivery owns the job now: store nothing, acknowledge this message."""

    reason: str


Decision = Done | Retry | WaitForDaemon | GiveUp | Drop


#: reasons a build waits out for up to ``BUILDQ_REGISTRY_WAIT_S`` instead of using its attempts: the
#: registry is away (down, restarting, answering 5xx/429)
REGISTRY_WAIT_REASONS = frozenset({"registry_unavailable"})


def never_reached(entry: Mapping[str, Any]) -> bool:
    """Whether an attempt never reached its daemon (dialing failed: nothing was built)."""
    return not entry.get("reached_daemon", True) and entry.get("reason") == NEVER_REACHED_REASON


def counts_as_attempt(entry: Mapping[str, Any]) -> bool:
    """Whether an attempt counts against ``BUILDQ_RETRY_MAX_ATTEMPTS``: all but one that never
    reached its daemon, and one the registry's absence failed (those are bounded by a wait)."""
    return not never_reached(entry) and entry.get("reason") not in REGISTRY_WAIT_REASONS


def trailing_since(
    history: Sequence[Mapping[str, Any]], current: float | None, alike: Callable[[Mapping[str, Any]], bool]
) -> float | None:
    """When the trailing run of attempts ``alike`` began (``current``: this attempt's start,
    itself one of them), else None."""
    since = current
    for entry in reversed(history):
        if not alike(entry):
            break
        started = entry.get("started_at_epoch")
        if isinstance(started, int | float):
            since = started
    return since


def unreached_since(history: Sequence[Mapping[str, Any]], current: float | None) -> float | None:
    """When the trailing run of attempts that never reached a daemon began, else None."""
    return trailing_since(history, current, never_reached)


def decide(s: Situation, settings: Settings, *, jitter: float) -> Decision:
    """What to do after ``s`` (pure). ``jitter`` in [0, 1) spreads retries and waits."""
    if s.outcome == FENCED:
        return Drop("another delivery claimed the job while this one built")
    if s.outcome == CANCELLED_BEFORE_START:
        return Done("cancelled")
    if s.outcome == LOST:  # attempts left: go on at once (here), else the job has failed
        counted = sum(1 for entry in s.history if counts_as_attempt(entry))
        return Done("failed") if counted >= settings.retry_max_attempts else Retry(0.0, "worker_lost")
    if s.outcome in (NO_DAEMON_BUSY, NO_DAEMON_DOWN):
        if s.outcome == NO_DAEMON_BUSY:  # up but full: come back soon, spread out
            return WaitForDaemon(delay=1.0 + 2.0 * jitter)
        since = s.waiting_since if s.waiting_since is not None else s.now
        left = settings.daemon_wait_s - (s.now - since)
        if left <= 0:
            return GiveUp()
        return WaitForDaemon(delay=max(0.1, min(1.0 + jitter, left)), waiting_since=since)
    if s.outcome == "succeeded":
        return Done("succeeded")
    if s.outcome == "cancelled":
        return Done("cancelled")
    if s.outcome != "failed" or not s.transient or s.cancel_requested:
        return Done("failed")  # a timeout, a permanent failure, or nobody wants it any more
    if not s.reached_daemon and s.reason == NEVER_REACHED_REASON:
        # the daemon never saw it: another daemon at once, no attempt used, for up to the wait
        unreached = unreached_since(s.history, s.started_at)
        if unreached is not None and s.now - unreached >= settings.daemon_wait_s:
            return GiveUp()
        return Retry(delay=0.0, reason=s.reason or "", avoid_daemon=True)
    if s.reason in REGISTRY_WAIT_REASONS:  # the registry is away: wait it out, backing off
        away = [e for e in s.history if e.get("reason") in REGISTRY_WAIT_REASONS]
        began = trailing_since(s.history, s.started_at, lambda e: e.get("reason") in REGISTRY_WAIT_REASONS)
        if began is not None and s.now - began >= settings.registry_wait_s:
            return Done("failed")
        base, cap = settings.retry_backoff_base_s, settings.retry_backoff_cap_s
        return Retry(delay=jitter * backoff_ceiling(1 + len(away), base=base, cap=cap), reason=s.reason or "")
    counted = 1 + sum(1 for entry in s.history if counts_as_attempt(entry))
    if counted >= settings.retry_max_attempts:
        return Done("failed")
    ceiling = backoff_ceiling(counted, base=settings.retry_backoff_base_s, cap=settings.retry_backoff_cap_s)
    return Retry(delay=jitter * ceiling, reason=s.reason or "", avoid_daemon=s.reason in DAEMON_LOST_REASONS)


# -- 3. doing it -------------------------------------------------------------------------------


class Progress:
    """Where a delivery's live progress goes (the Celery task: its state and events); no-op here.
    Called from the build's thread or the scheduler's; implementations do no blocking I/O."""

    def phase(self, job_id: str, attempt: int, phase: str) -> None:
        """The build entered ``phase`` (shown as the task's current state)."""

    def phases_ended(self, job_id: str, attempt: int, ended: Sequence[tuple[str, float]]) -> None:
        """These phases ended, with their seconds (``buildq-phase`` events)."""

    def daemon_down(self, daemon: str, error: str) -> None:
        """This build found ``daemon`` gone and opened its circuit breaker (once per outage)."""


@dataclass(frozen=True)
class Ending:
    """What the task does with the delivered message: ``finished`` (the ``record`` is stored, or was
    already; ``summary`` is Celery's result), ``requeued`` (its next message is published;
    acknowledge this one), ``dropped`` (another delivery owns the job: acknowledge, store nothing)."""

    kind: str
    record: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    countdown: float = 0.0
    reason: str = ""
    #: ``requeued``: the attempts so far (the last one is the attempt that just ended, if one ran)
    attempts: tuple[dict[str, Any], ...] = ()


@dataclass
class Build:
    """One claimed delivery while the lifecycle handles it (what hooks see)."""

    job: BuildJob
    claim: Claimed
    delivery: Delivery
    progress: Progress
    fence: Fence
    #: seconds to add to this worker's clock to read the Redis server's
    offset: float
    cache_key: str
    #: the job as the queue carries it (its messages are made from it)
    body: dict[str, Any]
    queue: str
    #: the attempts before this one (with the one a dead worker lost, when the claim found it)
    attempts: tuple[dict[str, Any], ...]
    redactor: Redactor | None
    number: int = 1
    daemon: str | None = None
    routing: str | None = None
    log: AttemptLog | None = None
    launched: bool = False
    #: a cancel was seen while the attempt ran (a notice, or the renewal's answer)
    cancel_seen: bool = False
    ended: bool = False
    #: the attempt's cache refs and its export lease (docs/cache-scopes.md); None before a launch
    cache_use: CacheUse | None = None
    #: the export lease is still ours after buildctl exited: the last write gives it back
    export_held: bool = False

    @property
    def history(self) -> History:
        return self.claim.history


class Lifecycle:
    """Handles deliveries for one worker process (made once per process, after the fork)."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: JobStore,
        quick: JobStore | None = None,
        launcher: Launcher,
        scheduler: Scheduler,
        hooks: Hooks,
        worker_id: str,
        domain: str,
        environ: Mapping[str, str],
        logs: LogStore | None = None,
        daemons: DaemonHealth | None = None,
        redact_values: Sequence[str] = (),
        stoppers: dict[str, Stopper] | None = None,
        runs: RunRegistry | None = None,
        archive: Archive | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        slot_wait_s: float = 5.0,
    ) -> None:
        self.settings, self.store, self.launcher, self.scheduler = settings, store, launcher, scheduler
        #: the same Redis for the scheduler's thread (renewals, progress): it never waits long
        self.quick = quick or store
        self.hooks, self.worker_id, self.domain, self.environ = hooks, worker_id, domain, environ
        self.logs, self.health, self.clock, self.rand = logs, daemons, clock, rand
        self.daemons = settings.daemons  # read once: the settings object is not consulted per job
        self.redact_values = list(redact_values)
        self.redactor = Redactor(self.redact_values) if self.redact_values else None
        self.checks = WorkerChecks(settings, environ)
        self.attestation_policy = attestation_policy(settings)
        #: running builds of this process by job id: a cancel notice stops one at once
        self.stoppers = stoppers if stoppers is not None else {}
        #: this host's run files (stamped while a run's claim is renewed; the reaper reads them)
        self.runs = runs
        #: where finished attempts' logs and records are kept (None: they stay in Redis)
        self.archive = archive
        self.slot_wait_s = slot_wait_s

    # -- the delivery --------------------------------------------------------------------------
    def handle(self, delivery: Delivery, progress: Progress | None = None) -> Ending:
        """Validate, claim, build once and apply what :func:`decide` says; the :class:`Ending`."""
        progress = progress or Progress()
        try:
            job = self._validated(delivery)
        except InvalidJobError as exc:
            return self._reject(delivery, exc)
        s = self.settings
        key = cache_key(job)
        body = job.to_message()
        queue = delivery.queue or (s.high_priority_queue if job.priority == "high" else s.queue)
        if job.supersede_key:  # a producer's own message did not supersede at submit (idempotent)
            self.store.supersede(job.job_id, job.supersede_key, made_at=job_id_time(job.job_id))
        # a lease held elsewhere may be a dead worker's (Celery redelivers at once when a pool
        # process dies): wait it out for one lease TTL before dropping this delivery as a duplicate
        held_until = time.monotonic() + s.lease_ttl_s + 1.0
        while True:
            claimed_at = self.clock()
            claim = self.store.claim(
                job.job_id, delivery=delivery.delivery, daemons=self.daemons, limit=s.buildkit_max_builds,
                ttl_s=s.lease_ttl_s, worker=self.worker_id, domain=self.domain,
                body=json.dumps(body, separators=(",", ":")), queue=queue,
                cache_key=key if s.cache_affinity else None, affinity_wait=s.affinity_wait_s > 0,
                export_key=key if job.push else None,
            )  # fmt: skip
            if not isinstance(claim, NotOurs) or not claim.held or time.monotonic() >= held_until:
                break
            time.sleep(min(0.5, s.lease_ttl_s / 3))
        if isinstance(claim, Finished):
            return Ending("finished", record=claim.record, summary=summary(claim.record))
        if not isinstance(claim, Claimed):
            why = "another delivery runs it" if claim.held else "not its current delivery"
            return Ending("dropped", reason=f"job {job.job_id}: {why}")
        build = self._build(job, claim, delivery, progress, key, body, queue, claimed_at)
        try:
            return self._run(build)
        except BaseException as exc:  # give the claim back; the janitor brings the job back
            if build.ended:  # the outcome is stored; what failed after it changes nothing
                raise
            what = f"{type(exc).__name__}: {exc}"
            if build.log is not None:
                build.log.close(f"attempt {build.number} interrupted on the worker ({what})")
            try:
                masked = build.redactor(what) if build.redactor is not None else what
                self.store.release(build.fence, error=masked)
            except Exception as again:  # noqa: BLE001 - the error that got us here matters more
                logger.warning("job %s: claim not given back: %s", job.job_id, again)
            raise

    def _validated(self, delivery: Delivery) -> BuildJob:
        if delivery.problem is not None:
            field_name, message = delivery.problem
            raise InvalidJobError(message, field=field_name)
        job = parse_job(delivery.job)
        if delivery.task_id is not None and delivery.task_id != job.job_id:
            raise InvalidJobError("the message's task id is not the job's job_id", field="job_id")
        self.checks(job)
        # attestations as the operator allows them, filled in (docs/attestations.md)
        return effective_attestations(job, self.attestation_policy, secret_values=self.redact_values)

    def _build(
        self, job: BuildJob, claim: Claimed, delivery: Delivery, progress: Progress, key: str,
        body: dict[str, Any], queue: str, at: float,
    ) -> Build:  # fmt: skip
        history = claim.history
        attempts = history.attempts
        if history.running is not None:  # the previous claim died (or was fenced out) mid-build
            lost = recording.lost_entry(history.running, number=len(attempts) + 1, now=claim.redis_now)
            attempts = (*attempts, lost)
            previous = history.running.get("gen")
            self._previous_run_over(job.job_id, previous if isinstance(previous, int) else claim.gen - 1,
                                    history.previous_domain)  # fmt: skip
        extra = context_secrets(job.context)  # a presigned URL's token, a git URL's userinfo
        redactor = Redactor([*self.redact_values, *extra]) if extra else self.redactor
        return Build(
            job=job, claim=claim, delivery=delivery, progress=progress,
            fence=Fence(job.job_id, claim.token, claim.gen, cache_key=key), offset=claim.redis_now - at,
            cache_key=key,
            body=body, queue=queue, attempts=attempts, redactor=redactor, number=len(attempts) + 1,
            daemon=claim.daemon,
        )  # fmt: skip

    def _run(self, build: Build) -> Ending:
        claim = build.claim
        if claim.cancelled:
            return self._conclude(build, self._situation(build, CANCELLED_BEFORE_START))
        if claim.history.running is not None:  # an attempt was lost: are any left?
            lost = self._situation(build, LOST)
            if isinstance(decide(lost, self.settings, jitter=0.0), Done):
                return self._conclude(build, lost)
        if build.daemon is None:
            build.daemon = self._wait_for_daemon(build)
            if build.daemon is None:
                why = NO_DAEMON_DOWN if self._all_down() else NO_DAEMON_BUSY
                return self._conclude(build, self._situation(build, why))
        build.routing = recording.routing_reason(claim.preferred, build.daemon)
        outcome, live = self._attempt(build)
        try:
            return self._conclude(build, self._situation(build, outcome.outcome, outcome), outcome, live)
        finally:
            if build.export_held:  # no write gave it back (fenced out, or Redis away): now
                self._release_export(build, exported=False)

    def _attempt(self, build: Build) -> tuple[Outcome, LivePhases]:
        """buildctl once on ``build.daemon``, watched; its outcome and its live phases."""
        s, job = self.settings, build.job
        assert build.daemon is not None
        log = build.log = self._attempt_log(build)
        watch = _BuildWatch(self, build, log)
        stopper = Stopper()
        self.stoppers[job.job_id] = stopper
        export_ref, imports = cache_refs(job, s.cache_default_scope)
        lease = self._export_lease(build, stopper) if job.push else "granted"
        build.cache_use = CacheUse(export_ref, tuple(imports), lease)
        spec = RunSpec(
            number=build.number, daemon=build.daemon, launcher=self.launcher, scheduler=self.scheduler,
            timeout_s=float(job.timeout_s or s.default_timeout_s), insecure_registries=s.insecure_registries,
            environ=self.environ, extra_transient=s.transient_patterns, clock=self.clock,
            gen=build.fence.gen, registry=self.runs, sbom_generator=s.sbom_scanner_image,
            cache=CachePlan(export_ref, tuple(imports), export=job.push and lease == "granted"),
        )  # fmt: skip
        self.hooks.attempt_started(build)
        build.launched = True
        outcome = None
        try:
            outcome = run_build(job, spec, watch, stopper)
        except BaseException:
            self.hooks.attempt_stopped(build)
            raise
        finally:
            self.stoppers.pop(job.job_id, None)
            if job.push and lease == "granted":
                if outcome is None:  # nothing to conclude: give it back now
                    self._release_export(build, exported=False)
                else:  # the build's last write (finish or requeue) gives it back in its round trip
                    build.export_held = True
        build.cancel_seen = watch.cancel_requested or stopper.reason == CANCELLED
        return outcome, watch.live

    def _export_lease(self, build: Build, stopper: Stopper) -> str:
        """The export lease of the build's cache ref (``lua/export_lease.lua``): ``granted``;
        ``skipped_newer`` when a newer build holds it or exported already; while an older build
        holds it, a wait for it of at most ``BUILDQ_CACHE_EXPORT_WAIT_S`` (a cancel ends it; the
        job's lease is renewed meanwhile), then ``skipped_busy``. Redis away: ``granted`` (an export
        as before the lease)."""
        s, job = self.settings, build.job
        deadline = time.monotonic() + s.cache_export_wait_s
        renewed = time.monotonic()
        asked = build.claim.export  # the claim asked already when the build started at once
        while True:
            try:
                answer, other = asked or self.store.take_export(
                    build.cache_key, job_id=job.job_id, order=build.history.enqueued_at, ttl_s=s.lease_ttl_s
                )
            except RedisUnavailable as exc:
                logger.info("job %s: export lease not asked (%s); exporting", job.job_id, exc)
                return "granted"
            asked = None
            if answer == "granted":
                return "granted"
            if answer == "newer":
                logger.info("job %s: newer build %s exports %s; skipping this export", job.job_id, other,
                            build.cache_key)  # fmt: skip
                return "skipped_newer"
            if time.monotonic() >= deadline or stopper.reason is not None:
                logger.info("job %s: older build %s still exports %s; skipping this export", job.job_id,
                            other, build.cache_key)  # fmt: skip
                return "skipped_busy"
            if time.monotonic() - renewed >= s.lease_ttl_s / 3:  # the claim stays ours while it waits
                renewed = time.monotonic()
                answer = self.store.renew(build.fence, ttl_s=s.lease_ttl_s)
                if answer != "ok":  # fenced out or cancelled: the run is stopped at its launch
                    stopper.stop(FENCED if answer == "fenced" else CANCELLED)
            time.sleep(min(0.25 * (0.5 + self.rand()), max(0.0, deadline - time.monotonic())))

    def _release_export(self, build: Build, *, exported: bool) -> None:
        """Give back the export lease on its own (when no last write did); ``exported`` when the
        evidence says the export completed (then no older build exports after this one)."""
        build.export_held = False
        try:
            self.store.release_export(build.cache_key, job_id=build.job.job_id,
                                      order=build.history.enqueued_at, exported=exported)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - it lapses after BUILDQ_LEASE_TTL_S
            logger.info("job %s: export lease not given back (%s); it lapses", build.job.job_id, exc)

    def _superseded_by(self, build: Build, state: str | None) -> str | None:
        """The newer job that cancelled this one (its ``supersede_key``), read for a cancelled one."""
        if state != "cancelled" or not build.job.supersede_key:
            return None
        try:
            raw = self.store.redis.hget(job_key(build.job.job_id), "superseded_by")
        except Exception:  # noqa: BLE001 - unknown: the record says a cancel, without its why
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

    def _situation(self, build: Build, what: str, outcome: Outcome | None = None) -> Situation:
        failure = outcome.failure if outcome is not None else None
        return Situation(
            history=tuple(_with_epoch(build.attempts)),
            outcome=what,
            now=self.clock() + build.offset,
            transient=bool(failure and failure.transient),
            reason=failure.reason if failure else None,
            reached_daemon=outcome.reached_daemon if outcome is not None else True,
            started_at=outcome.started_at + build.offset if outcome is not None else None,
            waiting_since=build.history.waiting_since,
            cancel_requested=build.cancel_seen or (failure is not None and self._cancel_flag(build)),
        )

    # -- applying a decision -------------------------------------------------------------------
    def _conclude(
        self,
        build: Build,
        situation: Situation,
        outcome: Outcome | None = None,
        live: LivePhases | None = None,
    ) -> Ending:
        """Decide, build what the decision needs (the entry, the record), then write it: the record
        (finish) or the next message (requeue), each once, through the hooks."""
        decision = decide(situation, self.settings, jitter=self.rand())
        job, now, history = build.job, situation.now, build.history
        final = isinstance(decision, Done | GiveUp)
        state = decision.state if isinstance(decision, Done) else "failed" if final else None
        log_entries: list[Entry] = []
        tail: list[str] = []
        if state is not None:
            log_entries, tail = self._log_ending(build, state)
        elif build.log is not None:
            build.log.close(_log_note(build, decision))
        # the attempt's log goes to the archive before the write that ends it: a reader told the job
        # ended finds it whole there
        archived = self._archive_attempt(build)
        log_end = self._log_end(build, log_entries, archived)
        pushed = self._read_pushed(build, outcome) if state == "succeeded" else None
        concluded = recording.conclude(
            job, outcome, build.attempts, offset=build.offset,
            window_start=history.window_start or history.enqueued_at, window_end=now, routing=build.routing,
            live=live, state=state, gave_up=self._unavailable(now) if isinstance(decision, GiveUp) else None,
            log_tail=tail, enqueued_at=history.enqueued_at, worker=self.worker_id, redactor=build.redactor,
            baseline=self._baseline(build), cache_key=build.cache_key, pushed=pushed,
            cache=build.cache_use, superseded_by=self._superseded_by(build, state),
        )  # fmt: skip

        def commit(writes: EndWrites) -> bool:
            if isinstance(decision, Drop):
                return False
            return self._persist(job.job_id, lambda: write(writes))

        exported = concluded.export_outcome == "exported"
        export = ExportRelease(history.enqueued_at, exported) if build.export_held else None

        def write(writes: EndWrites) -> bool:
            if state is not None:
                assert concluded.record_json is not None
                stored = self.store.finish(
                    build.fence, record=concluded.record_json, state=state, log=log_end,
                    remember=writes.remember, baseline=writes.baseline, export=export,
                    keep_s=self.settings.archived_record_ttl_s if self.archive is not None else 0,
                )  # fmt: skip
            else:
                assert isinstance(decision, Retry | WaitForDaemon)
                stored = self._requeue(build, decision, concluded.attempts, now, export)
            build.export_held = False  # given back by that step, whatever its fence said
            return stored

        stored = self.hooks.ended(build, concluded, commit, launched=build.launched)
        build.ended = True
        if stored and state is not None and concluded.record_json is not None:
            self._archive_record(job.job_id, concluded.record_json)
        if isinstance(decision, Drop):
            logger.warning("job %s: fenced out (%s); its result is not stored", job.job_id, decision.reason)
            if build.launched:  # its buildctl was killed when the renewal said so: a takeover may go
                try:
                    self.store.mark_dead(job.job_id, build.fence.gen)
                except Exception as exc:  # noqa: BLE001 - the takeover's wait ends by itself
                    logger.info("job %s: could not say its run is over: %s", job.job_id, exc)
            return Ending("dropped", reason=decision.reason)
        if not stored:
            logger.warning("job %s: another delivery claimed it; this one's outcome is dropped", job.job_id)
            return Ending("dropped", reason="another delivery claimed the job")
        ended = list(concluded.live_ended or ())
        if final and outcome is not None:
            ended.append(("finalize", max(0.0, self.clock() - outcome.exited_at)))
        if ended:
            build.progress.phases_ended(job.job_id, build.number, ended)
        if not final:
            assert isinstance(decision, Retry | WaitForDaemon)
            phase = "retry_wait" if isinstance(decision, Retry) else "waiting_for_daemon"
            why = decision.reason if isinstance(decision, Retry) else _wait_reason(decision)
            self.hooks.requeued(build, concluded.entry, phase=phase, delay=decision.delay, reason=why)
            attempts = tuple(concluded.attempts)
            return Ending("requeued", countdown=decision.delay, reason=phase, attempts=attempts)
        return Ending("finished", record=concluded.record, summary=concluded.summary)

    def _read_pushed(self, build: Build, outcome: Outcome | None) -> dict[str, Any] | None:
        """What the registry holds of the index a successful build pushed (its platforms and
        attestation manifests, docs/attestations.md); None when no index was pushed. A failed read
        is said in the record (``registry_error``): the image is pushed, the build succeeded."""
        job = build.job
        digest = pushed_index(outcome.metadata if outcome is not None else None)
        if not job.push or digest is None:
            return None
        tag = job.tags[0]
        try:
            reader = RegistryReader(
                tag, insecure=is_insecure(tag, self.settings.insecure_registries),
                # the claim is not renewed between buildctl's exit and the record: a third of a lease
                timeout_s=min(self.settings.registry_read_timeout_s, self.settings.lease_ttl_s / 3),
            )  # fmt: skip
            found = read_pushed(reader, digest)
        except (RegistryReadError, ValueError, KeyError, TypeError) as exc:
            logger.warning("job %s: the pushed index was not read back: %s", job.job_id, exc)
            return {"platforms": None, "attestations": [], "registry_error": str(exc)[:500]}
        return {
            "platforms": found.platforms,
            "attestations": [a.as_record() for a in found.attestations],
            "registry_error": None,
        }

    def _persist(self, job_id: str, write: Callable[[], bool]) -> bool:
        """``write()`` (an attempt's outcome: its record or its next message), waiting for Redis as
        long as it takes: the build is done, and it is worth more than the wait. Redis being away
        longer than ``BUILDQ_REDIS_RETRY_S`` is logged once; the claim's fence keeps a late write
        from covering what another delivery did meanwhile."""
        said = False
        while True:
            try:
                return write()
            except RedisUnavailable as exc:
                if not said:
                    logger.warning("job %s: %s; its outcome is stored once Redis is back", job_id, exc)
                    said = True
                time.sleep(1.0)

    def _requeue(
        self,
        build: Build,
        decision: Retry | WaitForDaemon,
        attempts: Sequence[dict[str, Any]],
        now: float,
        export: ExportRelease | None,
    ) -> bool:
        """Publish the job's next message and give back the claim (fenced) and the export lease
        ``export`` (fenced by its holder); False when the claim is not ours."""
        job = build.job
        retry = isinstance(decision, Retry)
        message, delivery, tag = next_message(
            job.job_id, build.queue, build.body, eta=now + decision.delay if decision.delay > 0 else None,
            retries=build.delivery.retries + 1,
        )  # fmt: skip
        avoid = build.daemon if isinstance(decision, Retry) and decision.avoid_daemon else None
        history = build.history
        return self.store.requeue(
            build.fence, queue=build.queue, message=message, tag=tag, delivery=delivery,
            phase="retry_wait" if retry else "waiting_for_daemon", attempts=[_public(a) for a in attempts],
            window_start=now if retry else (history.window_start or history.enqueued_at),
            waiting_since=decision.waiting_since if isinstance(decision, WaitForDaemon) else None,
            avoid=avoid, export=export,
        )  # fmt: skip

    # -- the parts -----------------------------------------------------------------------------
    def _reject(self, delivery: Delivery, exc: InvalidJobError) -> Ending:
        """An invalid job: a failed record naming the field, for the job's own delivery only;
        buildctl is never launched. A message whose job id is not even valid stores nothing."""
        raw = delivery.job if isinstance(delivery.job, dict) else {}
        job_id = raw.get("job_id") if isinstance(raw.get("job_id"), str) else delivery.task_id
        if not isinstance(job_id, str) or not JOB_ID_PATTERN_RE.match(job_id):
            logger.warning("a build message without a valid job id was dropped: %s", exc.message)
            return Ending("dropped", reason=exc.message)
        retry_of = raw.get("retry_of")
        now = self.clock()
        record = recording.rejected_record(
            job_id, message=exc.message, field=exc.field, enqueued_at=now, finished_at=now,
            worker=self.worker_id,
            retry_of=retry_of if isinstance(retry_of, str) and JOB_ID_PATTERN_RE.match(retry_of) else None,
        )  # fmt: skip
        context = raw.get("context")
        extra = context_secrets(context) if isinstance(context, str) else []
        redactor = Redactor([*self.redact_values, *extra]) if extra else self.redactor
        if redactor is not None:
            record = redactor.redact_tree(record)
        text, brief = validated_record(record)
        if not self.store.reject(job_id, delivery=delivery.delivery, record=text):
            existing = self.store.result(job_id)
            if existing is not None:
                return Ending("finished", record=existing, summary=summary(existing))
            return Ending("dropped", reason=f"job {job_id} belongs to another delivery")
        self._archive_record(job_id, text)
        self.hooks.rejected(record)
        return Ending("finished", record=record, summary=brief)

    def _wait_for_daemon(self, build: Build) -> str | None:
        """A daemon slot: the remembered daemon alone first when it is up but full (for at most
        ``BUILDQ_AFFINITY_WAIT_S``), then any, polling for at most ``slot_wait_s``; None when all
        stayed full (or all are down: then at once)."""
        s, claim = self.settings, build.claim
        if self._all_down():
            return None
        started = time.monotonic()
        avoid = build.attempts[-1].get("daemon") if build.attempts else None
        stages: list[tuple[str | None, float, str | None]] = []
        if claim.preferred is not None and claim.preferred_full and s.affinity_wait_s > 0:
            stages.append((claim.preferred, s.affinity_wait_s, None))
        stages.append((None, self.slot_wait_s, avoid))
        for only, budget, avoided in stages:
            left_s = self.slot_wait_s - (time.monotonic() - started)
            deadline = time.monotonic() + max(0.0, min(budget, left_s))
            while True:
                daemon = self.store.take_slot(
                    build.fence, self.daemons, limit=s.buildkit_max_builds, attempt=build.number,
                    worker=self.worker_id, avoid=avoided, only=only,
                )  # fmt: skip
                if daemon is not None:
                    return daemon
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.2 * (0.5 + self.rand())))
        return None

    def _all_down(self) -> bool:
        if self.health is None:
            return False
        down = self.health.down()
        return all(d in down for d in self.daemons)

    def _unavailable(self, now: float) -> str:
        states = self.health.states(self.daemons) if self.health is not None else []
        parts = [
            f"{d.daemon} down for {now - (d.since or now):.0f}s ({d.error or 'no answer'})"
            for d in states
            if not d.up
        ]
        wait = self.settings.daemon_wait_s
        return f"no BuildKit daemon answered within BUILDQ_DAEMON_WAIT_S={wait:g}s: " + "; ".join(parts)

    def _cancel_flag(self, build: Build) -> bool:
        try:
            return self.store.cancel_requested(build.job.job_id)
        except Exception:  # noqa: BLE001 - unknown: do as if not
            return False

    def _baseline(self, build: Build) -> Callable[[], Sequence[bytes]]:
        """Reads the raw entries of the build's repository baseline (for ``explain``)."""
        key, n, client = BASELINE_PREFIX + build.cache_key, self.settings.baseline_n, self.store.redis

        def read() -> Sequence[bytes]:
            try:
                return [v if isinstance(v, bytes) else str(v).encode() for v in client.lrange(key, 0, n - 1)]
            except Exception as exc:  # noqa: BLE001 - explain is not worth a failed build
                logger.info("job %s: baseline not read: %s", build.job.job_id, exc)
                return []

        return read

    def _previous_run_over(self, job_id: str, gen: int, domain: str | None) -> None:
        """Make sure the run of claim ``gen`` (this job's previous one, which never ended) is over
        before this claim launches another: on this host, kill it; on another host, wait until that
        host's reaper (or the run's own supervisor, fenced out) says it is dead, or the host's
        heartbeat is gone — for at most a lease and a few reaper passes, then go on, logging it."""
        if domain is None or domain == self.domain:
            try:
                self.launcher.kill_orphan(job_id, gen)
                if self.runs is not None:
                    self.runs.forget(job_id, below_gen=gen + 1)
                self.store.mark_dead(job_id, gen)
            except Exception as exc:  # noqa: BLE001 - best effort: the reaper of this host remains
                logger.warning("job %s: leftover buildctl not killed: %s", job_id, exc)
            return
        deadline = time.monotonic() + self.settings.lease_ttl_s + TAKEOVER_SLACK_S
        while time.monotonic() < deadline:
            if self.store.dead_gen(job_id) >= gen or domain not in self.store.live(DOMAINS):
                return
            time.sleep(0.2)
        logger.warning("job %s: the run of claim %d on %s is not known dead after %.0fs; going on",
                       job_id, gen, domain, self.settings.lease_ttl_s + TAKEOVER_SLACK_S)  # fmt: skip

    def _attempt_log(self, build: Build) -> AttemptLog | None:
        if self.logs is None:
            return None
        archive = self.archive is not None
        log = AttemptLog(
            self.logs, build.job.job_id, build.number, redactor=build.redactor, archive=archive,
            max_bytes=self.settings.log_max_bytes,
        )  # fmt: skip
        log.mark(f"attempt {build.number} started on {self.worker_id}")
        return log

    def _log_ending(self, build: Build, state: str) -> tuple[list[Entry], list[str]]:
        """The attempt log's unwritten end and its ``final:`` mark (for the finishing write), and
        the failing step's output tail."""
        if build.log is not None:
            return build.log.ending(state)
        if self.logs is None:
            return [], []
        return [(build.number, "end", f"{FINAL_PREFIX} {state}")], []

    def _log_end(self, build: Build, entries: Sequence[Entry], archived: bool) -> LogEnd | None:
        """How the finishing write ends the log. Archived: nothing more is written (the archive has
        it all; followers read the end there), and a stream the flushes made is kept only
        ``BUILDQ_LOG_ARCHIVED_TTL_S``. Else its last lines, and its TTL set unless a flush set it."""
        if self.logs is None or not entries:
            return None
        written = build.log is not None and build.log.written
        if archived:
            return LogEnd(ttl_s=self.settings.log_archived_ttl_s if written else 0)
        return LogEnd(
            attempt=build.number, lines=encode_lines((kind, line) for _, kind, line in entries),
            maxlen=self.logs.maxlen, exact=False, ttl_s=0 if written else self.logs.ttl_s,
        )  # fmt: skip

    def _archive_attempt(self, build: Build) -> bool:
        """Keep the attempt's whole log in the archive (once it is closed); False when there is no
        archive or it could not be written (then the log stays in Redis, as without one)."""
        gz = build.log.archived() if self.archive is not None and build.log is not None else None
        if gz is None:
            return False
        assert self.archive is not None
        try:
            self.archive.write_attempt(build.job.job_id, build.number, gz)
        except ArchiveError as exc:
            logger.warning("job %s: attempt %d's log not archived (kept in Redis): %s",
                           build.job.job_id, build.number, exc)  # fmt: skip
            return False
        return True

    def _archive_record(self, job_id: str, record: str) -> None:
        """Keep the final record in the archive (Redis keeps it ``BUILDQ_ARCHIVED_RECORD_TTL_S``);
        when that fails, Redis keeps it for the whole ``BUILDQ_RESULT_TTL_S`` instead."""
        if self.archive is None:
            return
        try:
            self.archive.write_record(job_id, record)
        except ArchiveError as exc:
            logger.warning("job %s: record not archived (Redis keeps it): %s", job_id, exc)
            try:
                self.store.keep(job_id, self.settings.result_ttl_s)
            except Exception as again:  # noqa: BLE001 - the record stays for the shorter time
                logger.warning("job %s: record kept for BUILDQ_ARCHIVED_RECORD_TTL_S only: %s", job_id, again)


def _log_note(build: Build, decision: Decision) -> str:
    """The mark that closes an attempt's log when the job goes on."""
    if isinstance(decision, Retry):
        return f"attempt {build.number} failed ({decision.reason}); retrying in {decision.delay:.2f}s"
    if isinstance(decision, Drop):
        return f"attempt {build.number} stopped: {decision.reason}"
    return f"attempt {build.number}: waiting for a BuildKit daemon"


def _wait_reason(decision: WaitForDaemon) -> str:
    """Why a job waits for a daemon, in a few words."""
    return "every daemon is down" if decision.waiting_since is not None else "every daemon is full"


def _with_epoch(attempts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history with each entry's start as epoch seconds (``started_at_epoch``) for :func:`decide`."""
    out = []
    for entry in attempts:
        started = entry.get("started_at")
        try:
            epoch = datetime.fromisoformat(started).timestamp() if isinstance(started, str) else None
        except ValueError:
            epoch = None
        out.append({**entry, "started_at_epoch": epoch})
    return out


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    """An attempt entry without what only :func:`decide` uses."""
    return {k: v for k, v in entry.items() if k != "started_at_epoch"}


class _BuildWatch(Watch):
    """The lifecycle's side of a running build: the log, live phases, the holder's renewal."""

    def __init__(self, lifecycle: Lifecycle, build: Build, log: AttemptLog | None) -> None:
        self.lifecycle, self.build, self.log = lifecycle, build, log
        self.interval_s = lifecycle.settings.lease_ttl_s / 3
        self.live = LivePhases(lifecycle.clock, lifecycle.clock())
        self.cancel_requested = False
        self._shown = False

    def started(self, started_at: float) -> list[Handle]:
        b, sched = self.build, self.lifecycle.scheduler
        self.live = LivePhases(self.lifecycle.clock, started_at)
        window = b.history.window_start or b.history.enqueued_at
        queued = max(0.0, started_at + b.offset - window)
        b.progress.phases_ended(b.job.job_id, b.number, [("queued", queued)])
        # the claim wrote the job `running`; the task's live state (Celery's) is shown from 250 ms
        # in, so a build that ends sooner costs nothing more
        handles = [sched.later(0.25, self._go_live)]
        if self.log is not None:
            handles.append(sched.every(FLUSH_EVERY_S, self.log.flush))
        return handles

    def line(self, line: str, status: SolveStatus | None) -> None:
        if self.log is not None:
            self.log.feed(line, status)
        ended = self.live.on_output(status)
        if ended:
            b = self.build
            b.progress.phases_ended(b.job.job_id, b.number, ended)
            if self._shown:
                b.progress.phase(b.job.job_id, b.number, self.live.current)

    def check(self) -> str | None:
        """The renewal (every ``BUILDQ_LEASE_TTL_S`` / 3): the lease kept, the phase written."""
        b, lc = self.build, self.lifecycle
        try:
            answer = lc.quick.renew(b.fence, ttl_s=lc.settings.lease_ttl_s, phase=self.live.current)
        except Exception as exc:  # noqa: BLE001 - Redis away: keep building, renew next time
            logger.info("job %s: lease not renewed (%s); trying again", b.job.job_id, exc)
            return None
        if answer == "fenced":
            logger.warning("job %s: another delivery claimed it; stopping this build", b.job.job_id)
            return FENCED
        if b.cache_use is not None and b.cache_use.exporting and b.job.push:
            try:  # the export lease lives as long as the job's lease
                lc.quick.take_export(b.cache_key, job_id=b.job.job_id, order=b.history.enqueued_at,
                                     ttl_s=lc.settings.lease_ttl_s)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - renewed next time
                logger.info("job %s: export lease not renewed (%s)", b.job.job_id, exc)
        if answer == "cancel":
            self.cancel_requested = True
            return CANCELLED
        return None

    def _go_live(self) -> None:
        b = self.build
        self._shown = True
        b.progress.phase(b.job.job_id, b.number, self.live.current)


# ----------------------------------------------------------------------------------------------
# Checks of a job that only the worker can make (its filesystem, its limits, its environment,
# what its operator granted).
#
# They run before anything is claimed or launched; a failing check raises
# :class:`~buildq.errors.InvalidJobError` naming the field, and the job is rejected.
def check_job_on_worker(
    job: BuildJob,
    *,
    environ: Mapping[str, str],
    max_timeout_s: int,
    secret_env: Sequence[str],
    context_roots: Sequence[str],
    real_context_roots: Sequence[str],
    allowed_repositories: Sequence[str],
    git_transports: Sequence[str] = ("https", "git"),
) -> None:
    """Checks only the worker can make; raise InvalidJobError naming the field.

    The grants come first, so a refused job learns nothing of the worker's files or variables.
    ``real_context_roots`` are ``context_roots`` with symlinks resolved (once, at the worker's start).
    """
    check_secrets(job, secret_env)
    check_repositories(job, allowed_repositories)
    if job.is_git:
        check_git_transport(job.context, git_transports)
    if not job.is_remote:  # BuildKit fetches a git or archive URL itself; context roots are for directories
        real_context = os.path.realpath(job.context)
        check_not_pseudo("context", job.context, job.context, real_context)
        refused = context_outside_roots(job.context, real_context, context_roots, real_context_roots)
        if refused is not None:
            raise InvalidJobError(refused, field="context")
        if not os.path.isdir(job.context):
            raise InvalidJobError(
                f"context: {job.context!r} is not a directory on the worker "
                "(from another machine: buildq submit --upload)",
                field="context",
            )
        if not os.access(job.context, os.R_OK | os.X_OK):
            raise InvalidJobError(f"context: {job.context!r} is not readable by the worker", field="context")
        dockerfile = os.path.join(job.context, job.dockerfile)
        if not os.path.isfile(dockerfile):
            raise InvalidJobError(
                f"dockerfile: {job.dockerfile!r} not found in the context", field="dockerfile"
            )
        real_dockerfile = os.path.realpath(dockerfile)
        check_not_pseudo("dockerfile", job.dockerfile, os.path.dirname(real_dockerfile))
        if os.path.commonpath([real_context, real_dockerfile]) != real_context:
            raise InvalidJobError("dockerfile: resolves outside the context", field="dockerfile")
    if job.timeout_s is not None and job.timeout_s > max_timeout_s:
        raise InvalidJobError(
            f"timeout_s: {job.timeout_s} exceeds the worker's maximum {max_timeout_s} (BUILDQ_MAX_TIMEOUT_S)",
            field="timeout_s",
        )
    for index, secret in enumerate(job.secrets):
        if secret.env not in environ:
            raise InvalidJobError(
                f"secrets[{index}].env: environment variable {secret.env!r} is not set on the worker",
                field=f"secrets[{index}].env",
            )


def attestation_policy(settings: Settings) -> AttestationPolicy:
    """The operator's attestation settings as the contract's policy."""
    return AttestationPolicy(
        provenance_default=settings.provenance_default,
        provenance_allowed=tuple(settings.provenance_allowed),
        sbom_default=settings.sbom_default,
        sbom_allowed=settings.sbom_allowed,
    )


class WorkerChecks:
    """:func:`check_job_on_worker` with this worker's settings (context roots resolved once)."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings, self.environ = settings, environ
        self.real_context_roots = [os.path.realpath(root) for root in settings.context_roots]

    def __call__(self, job: BuildJob) -> None:
        check_job_on_worker(
            job,
            environ=self.environ,
            max_timeout_s=self.settings.max_timeout_s,
            secret_env=self.settings.secret_env,
            context_roots=self.settings.context_roots,
            real_context_roots=self.real_context_roots,
            allowed_repositories=self.settings.allowed_repositories,
            git_transports=self.settings.git_transports,
        )
