"""Side effects of a build's lifecycle, as middleware with named hook methods (dramatiq's way).

The lifecycle (:mod:`buildq.engine.lifecycle`) decides; the hooks here react at named points and
never decide anything. Each is one concern:

- :class:`MetricsHook`: Prometheus counters and histograms (the metric objects are at the end of
  this module);
- :class:`BreakerHook`: opens a daemon's circuit breaker when buildctl could not dial it;
- :class:`BaselineHook`: a build that succeeded in one attempt joins its repository's baseline
  (what the next builds' ``explain`` compares with);
- :class:`AffinityHook`: remembers the daemon a build succeeded on, for its cache;
- :class:`LogHook`: the worker log's lines of a build (its start, a retry and its reason, its end),
  each with its fields for the JSON log format.

:class:`Hooks` calls them in order, once per ending (:meth:`Hooks.ended`): what a hook adds to the
write that ends the attempt (:class:`EndWrites`) is stored in the same round trip as the record or
the requeue; ``finished`` runs once the record is stored.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..buildkit.classify import DAEMON_STATE_REASONS, PERMANENT_REASONS, TRANSIENT_REASONS
from ..buildkit.phases import ALL_KEYS, PHASES
from ..store.daemons import DaemonHealth
from ..store.gauges import GaugeRead
from ..store.jobs import BASELINE_TTL_S
from ..store.keys import BASELINE_PREFIX

if TYPE_CHECKING:
    from .lifecycle import Build
    from .recording import Concluded

logger = logging.getLogger("buildq.engine")


@dataclass
class EndWrites:
    """What hooks add to the write that ends an attempt: the cache key and the daemon to remember
    for it (stored for a success only) and the repository baseline's new entry (list key, entry, N,
    TTL s)."""

    remember: tuple[str, str] | None = None
    baseline: tuple[str, bytes, int, int] | None = None


class Hook:
    """A side effect at named points of the lifecycle; every method does nothing by default."""

    def attempt_started(self, build: Build) -> None:
        """buildctl is about to be launched for ``build``'s current attempt."""

    def attempt_stopped(self, build: Build) -> None:
        """That attempt's buildctl is gone (called whatever way the run ended)."""

    def attempt_ended(self, build: Build, entry: dict[str, Any]) -> None:
        """An attempt ended with this ``attempts`` entry (before a retry or the final record)."""

    def requeued(
        self, build: Build, entry: dict[str, Any] | None, *, phase: str, delay: float, reason: str
    ) -> None:
        """The job went back to its queue after this delivery (its next message is published):
        ``phase`` ``retry_wait`` (``entry``: the attempt that failed, ``reason`` why) or
        ``waiting_for_daemon``; the next delivery is due in ``delay`` seconds."""

    def finishing(self, build: Build, concluded: Concluded, writes: EndWrites) -> None:
        """The final record is about to be stored; a hook may add to the same write."""

    def finished(self, build: Build, concluded: Concluded) -> None:
        """The final record is stored."""

    def rejected(self, record: dict[str, Any]) -> None:
        """The record of an invalid job is stored."""


class Hooks:
    """The process's hooks, called in order."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def attempt_started(self, build: Build) -> None:
        for hook in self.hooks:
            hook.attempt_started(build)

    def attempt_stopped(self, build: Build) -> None:
        for hook in self.hooks:
            hook.attempt_stopped(build)

    def ended(
        self, build: Build, concluded: Concluded, commit: Callable[[EndWrites], bool], *, launched: bool
    ) -> bool:
        """An attempt (or a delivery that launched nothing) ends: ``attempt_stopped`` when buildctl
        ran, ``attempt_ended`` with its entry, ``finishing`` when the job is over, then ``commit``
        (the store's write: the record, or the requeue), then ``finished`` once a record is stored.
        What ``commit`` returned (False: the claim was no longer ours, nothing was written)."""
        if launched:
            self.attempt_stopped(build)
        if concluded.entry is not None:
            for hook in self.hooks:
                hook.attempt_ended(build, concluded.entry)
        writes = EndWrites()
        if concluded.record is not None:
            for hook in self.hooks:
                hook.finishing(build, concluded, writes)
        stored = commit(writes)
        if stored and concluded.record is not None:
            for hook in self.hooks:
                try:
                    hook.finished(build, concluded)
                except Exception:  # noqa: BLE001 - the record is stored; a side effect may fail
                    logger.exception("hook %s failed after job %s was stored", type(hook).__name__,
                                     build.job.job_id)  # fmt: skip
        return stored

    def requeued(
        self, build: Build, entry: dict[str, Any] | None, *, phase: str, delay: float, reason: str
    ) -> None:
        for hook in self.hooks:
            hook.requeued(build, entry, phase=phase, delay=delay, reason=reason)

    def rejected(self, record: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.rejected(record)


class MetricsHook(Hook):
    """Counts attempts and builds, observes phases (Prometheus, per process)."""

    def __init__(self, metrics: BuildMetrics | NoMetrics) -> None:
        self.metrics = metrics

    def attempt_started(self, build: Build) -> None:
        self.metrics.in_progress_inc()

    def attempt_stopped(self, build: Build) -> None:
        self.metrics.in_progress_dec()

    def attempt_ended(self, build: Build, entry: dict[str, Any]) -> None:
        if entry.get("daemon"):  # attempts that reached the launcher
            self.metrics.attempt_finished(entry)

    def finished(self, build: Build, concluded: Concluded) -> None:
        assert concluded.record is not None
        self.metrics.build_finished(concluded.record)
        if concluded.export_outcome is not None:
            self.metrics.cache_export(concluded.export_outcome)
        if concluded.record.get("superseded_by"):
            self.metrics.superseded_build("running" if build.launched else "queued")

    def rejected(self, record: dict[str, Any]) -> None:
        self.metrics.build_finished(record)


class BreakerHook(Hook):
    """An attempt whose buildctl could not dial its daemon opens that daemon's circuit breaker
    (the claim then skips it until a probe finds it answering); so does one the daemon's own state
    failed (a full disk, a broken snapshotter), held open for ``hold_s`` whatever probes say. The
    worker that opened it says so once per outage, in its log and as a Celery event."""

    def __init__(
        self, health: DaemonHealth | None, clock: Callable[[], float], *, hold_s: float = 60.0
    ) -> None:
        self.health, self.clock, self.hold_s = health, clock, hold_s

    def attempt_ended(self, build: Build, entry: dict[str, Any]) -> None:
        daemon = entry.get("daemon")
        if self.health is None or not daemon:
            return
        state = entry.get("reason") in DAEMON_STATE_REASONS  # its disk: it answers, yet cannot build
        if entry.get("reached_daemon", True) and not state:
            return
        error = str(entry.get("error") or "no answer")
        if self.health.mark_down(daemon, error, self.clock(), hold_s=self.hold_s if state else 0.0):
            logger.warning("BuildKit daemon %s is down: %s", daemon, error)
            build.progress.daemon_down(daemon, error)


class BaselineHook(Hook):
    """A build that succeeded in one attempt joins its repository's baseline (the list of the last
    ``BUILDQ_BASELINE_N`` such builds that ``explain`` compares a build with), in the finishing write."""

    def __init__(self, n: int) -> None:
        self.n = n

    def finishing(self, build: Build, concluded: Concluded, writes: EndWrites) -> None:
        if concluded.baseline_entry is not None:
            writes.baseline = (
                BASELINE_PREFIX + build.cache_key,
                concluded.baseline_entry,
                self.n,
                BASELINE_TTL_S,
            )


class AffinityHook(Hook):
    """Cache affinity: the daemon of a successful build is remembered for its cache key (the finish
    script stores it only for a success), so the next build with that cache goes there. A build
    that ran where its cache was remembered writes nothing (the memory lasts BUILDQ_RESULT_TTL_S
    from when it was written)."""

    def finishing(self, build: Build, concluded: Concluded, writes: EndWrites) -> None:
        if build.daemon and build.daemon != build.claim.preferred:
            writes.remember = (build.cache_key, build.daemon)


#: the logger of the build lines (:class:`LogHook`)
build_log = logging.getLogger("buildq.builds")
#: characters of an error kept in a log line
LOG_ERROR_CHARS = 300


def _one_line(text: object, limit: int = LOG_ERROR_CHARS) -> str:
    return " ".join(str(text or "").split())[:limit]


class LogHook(Hook):
    """The worker log's lines of a build, all made here: one when an attempt starts, one when the
    job goes back to its queue (a retry names the reason; a wait for a daemon is a DEBUG line),
    one when the job ends (INFO for a success, one WARNING line for a failure or a cancellation,
    never a traceback). Each line carries its fields (``extra``: ``event``, ``job_id``,
    ``attempt``, ``daemon``, ``phase``, ``duration_s`` …) for ``BUILDQ_LOG_FORMAT=json``; the
    texts come from the record and its attempts, already redacted."""

    def attempt_started(self, build: Build) -> None:
        job_id, number = build.job.job_id, build.number
        build_log.info(
            "build %s attempt %d started on %s (%s)", job_id, number, build.daemon, build.routing or "-",
            extra={"event": "build_started", "job_id": job_id, "attempt": number, "daemon": build.daemon,
                   "routing": build.routing, "queue": build.queue, "phase": "launch"},
        )  # fmt: skip

    def requeued(
        self, build: Build, entry: dict[str, Any] | None, *, phase: str, delay: float, reason: str
    ) -> None:
        job_id = build.job.job_id
        fields: dict[str, Any] = {
            "event": "build_requeued", "job_id": job_id, "attempt": build.number, "daemon": build.daemon,
            "phase": phase, "reason": reason, "delay_s": round(delay, 3),
        }  # fmt: skip
        if phase != "retry_wait":
            build_log.debug(
                "build %s waits for a BuildKit daemon (%s); next try in %.2fs", job_id, reason, delay,
                extra=fields,
            )  # fmt: skip
            return
        error = _one_line((entry or {}).get("error"))
        if entry is not None:
            fields.update(outcome=entry.get("outcome"), duration_s=entry.get("duration_s"), error=error)
        build_log.info(
            "build %s attempt %d failed (%s); retry in %.2fs%s", job_id, build.number, reason, delay,
            f": {error}" if error else "", extra=fields,
        )  # fmt: skip

    def finished(self, build: Build, concluded: Concluded) -> None:
        assert concluded.record is not None
        self._ended(concluded.record)

    def rejected(self, record: dict[str, Any]) -> None:
        self._ended(record)

    def _ended(self, record: dict[str, Any]) -> None:
        state, job_id = record.get("state"), record.get("job_id")
        error = record.get("error") or {}
        attempts = record.get("attempts") or []
        fields = {
            "event": "build_finished", "job_id": job_id, "state": state, "attempt": len(attempts) or None,
            "daemon": record.get("daemon"), "duration_s": record.get("duration_s"), "phase": "done",
            "phases": record.get("phases"), "reason": error.get("reason"), "error_kind": error.get("kind"),
            "digest": (record.get("image") or {}).get("digest"),
        }  # fmt: skip
        if state == "succeeded":
            build_log.info(
                "build %s succeeded in %.2fs (%d attempt%s) on %s", job_id, record.get("duration_s") or 0.0,
                len(attempts), "" if len(attempts) == 1 else "s", record.get("daemon"), extra=fields,
            )  # fmt: skip
            return
        build_log.warning(
            "build %s %s (%s): %s", job_id, state, error.get("kind"), _one_line(error.get("message"), 2000),
            extra=fields,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Prometheus metrics of a worker (``prometheus_client`` multiprocess mode for the prefork pool).
#
# ``prepare_multiprocess_dir`` must run in the worker's main process *before* ``prometheus_client``
# is imported anywhere (the library picks its value class at import time); the CLI does this.
# Each pool process makes its own :class:`BuildMetrics` after the fork (registered in no registry:
# in multiprocess mode a value lives in the process's mmap files, so a pool process made later, or
# made again after a crash, never collides with one made before), and ``serve_metrics`` (main
# process) aggregates every process's files on ``BUILDQ_METRICS_PORT``. A pool process that ended
# keeps its counters there; its live gauges are dropped (:func:`mark_process_dead`).
#
# Metrics of the pool processes (counters start at 0 for every known label value, so
# ``increase(...[5m])`` sees the first one after a restart; label values come from the fixed sets
# below, anything else is counted as ``other``):
# - ``buildq_build_phase_seconds{phase,outcome}``: histogram, one observation per phase per finished
#   build, by the build's outcome (succeeded | failed | cancelled)
# - ``buildq_builds_total{outcome}``: succeeded | failed | cancelled
# - ``buildq_build_attempts_total{outcome,reason}``: every attempt, with the classifier's reason
#   (at 0 from the start: each outcome with reason ``none``, and ``failed`` with every reason)
# - ``buildq_build_steps_total{kind}``: cached | executed Dockerfile steps
# - ``buildq_cache_exports_total{outcome}``: builds that asked for a registry cache export, by what
#   the evidence says: exported | failed (buildctl may still exit 0) | skipped (ended before it), or
#   why the export lease kept it from exporting: skipped_newer | skipped_busy (docs/cache-scopes.md)
# - ``buildq_superseded_total{was}``: builds cancelled by a newer job of their supersede_key, by
#   where they were: queued | running
# - ``buildq_builds_in_progress``: attempts running now on this worker (summed over live processes)
# - ``buildq_routing_total{reason}``: attempts launched on a daemon, by why that daemon
#   (affinity | least_loaded | fallback)
# - ``buildq_slow_phases_total{phase}``: phases the record's ``explain`` flagged (``step`` for a step)
# Of the worker's main process:
# - ``buildq_janitor_requeues_total``: build messages the janitor put back (lost by the broker, or
#   left unacknowledged by a worker that went away)
# - ``buildq_daemon_up{daemon}``: 1 while the daemon answers, 0 while its circuit breaker is open
# - the deployment's queue gauges (:class:`DeploymentGauges`, the same on every worker):
#   ``buildq_queue_depth{queue}``, ``buildq_queue_oldest_age_seconds``,
#   ``buildq_daemon_slots_in_use{daemon}``, ``buildq_daemon_slots{daemon}``, ``buildq_builds_running``,
#   ``buildq_daemons_full``, ``buildq_workers_live``, ``buildq_jobs_waiting_for_daemon``,
#   ``buildq_gauges_age_seconds``
OTHER = "other"
BUILD_OUTCOMES = ("succeeded", "failed", "cancelled")
ATTEMPT_OUTCOMES = ("succeeded", "failed", "cancelled", "timeout", "lease_lost", "lost")
#: every reason an attempt can end with: the classifier's, the launchers', the lifecycle's
FAILURE_REASONS = tuple(
    sorted(
        TRANSIENT_REASONS
        | PERMANENT_REASONS
        | {"worker_lost", "timeout", "invalid_job", "buildctl_missing"}
        | {"docker_error", "docker_unavailable", "docker_rejected", "image_pull_failed"}
    )
)
STEP_KINDS = ("cached", "executed")
EXPORT_OUTCOMES = ("exported", "failed", "skipped", "skipped_newer", "skipped_busy")
ROUTING_REASONS = ("affinity", "least_loaded", "fallback")
SUPERSEDED_WHERE = ("queued", "running")
PHASE_LABELS = ALL_KEYS
SLOW_PHASE_LABELS = (*PHASES, "step")


def bounded(value: object, known: Sequence[str]) -> str:
    """``value`` when it is one of ``known``, else ``other`` (a metric label never takes a value
    from outside a fixed set)."""
    return value if isinstance(value, str) and value in known else OTHER


PHASE_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(path: str | None) -> str:
    """Create an empty directory for multiprocess samples and point prometheus_client at it."""
    directory = path or os.path.join(tempfile.gettempdir(), f"buildq-metrics-{os.getpid()}")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    os.environ[MULTIPROC_ENV] = directory
    return directory


class BuildMetrics:
    """The metric objects of one pool process (made once per process, after the fork). ``registry``:
    where to register them (default: none; a test may give its own)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        kwargs = {"registry": registry}
        self.phase_seconds = Histogram(
            "buildq_build_phase_seconds",
            "Seconds per build phase, by the build's outcome",
            ["phase", "outcome"],
            buckets=PHASE_BUCKETS,
            **kwargs,
        )
        self.builds = Counter("buildq_builds_total", "Finished builds", ["outcome"], **kwargs)
        self.attempts = Counter(
            "buildq_build_attempts_total", "Build attempts", ["outcome", "reason"], **kwargs
        )
        self.steps = Counter("buildq_build_steps_total", "Dockerfile steps", ["kind"], **kwargs)
        self.cache_exports = Counter(
            "buildq_cache_exports_total", "Registry cache exports asked for", ["outcome"], **kwargs
        )
        self.superseded = Counter(
            "buildq_superseded", "Builds cancelled by a newer job of their supersede_key", ["was"], **kwargs
        )
        self.routing = Counter(
            "buildq_routing", "Attempts launched on a daemon, by why that daemon", ["reason"], **kwargs
        )
        self.slow_phases = Counter(
            "buildq_slow_phases_total", "Phases flagged as unusually slow", ["phase"], **kwargs
        )
        self.in_progress = Gauge(
            "buildq_builds_in_progress", "Build attempts running", multiprocess_mode="livesum", **kwargs
        )
        # every known label value at 0 from the start
        for outcome in BUILD_OUTCOMES:
            self.builds.labels(outcome=outcome)
        for outcome in ATTEMPT_OUTCOMES:
            self.attempts.labels(outcome=outcome, reason="none")
        for reason in FAILURE_REASONS:
            self.attempts.labels(outcome="failed", reason=reason)
        for kind in STEP_KINDS:
            self.steps.labels(kind=kind)
        for outcome in EXPORT_OUTCOMES:
            self.cache_exports.labels(outcome=outcome)
        for reason in ROUTING_REASONS:
            self.routing.labels(reason=reason)
        for was in SUPERSEDED_WHERE:
            self.superseded.labels(was=was)
        for phase in SLOW_PHASE_LABELS:
            self.slow_phases.labels(phase=phase)

    def in_progress_inc(self) -> None:
        """An attempt's buildctl started (``buildq_builds_in_progress``)."""
        self.in_progress.inc()

    def in_progress_dec(self) -> None:
        """That attempt's buildctl is gone."""
        self.in_progress.dec()

    def attempt_finished(self, attempt: dict[str, Any]) -> None:
        """Count one attempt launched on a daemon, by outcome and the classifier's reason, and by
        why that daemon (``routing``)."""
        self.attempts.labels(
            outcome=bounded(attempt.get("outcome"), ATTEMPT_OUTCOMES),
            reason=bounded(attempt.get("reason") or "none", ("none", *FAILURE_REASONS)),
        ).inc()
        if attempt.get("routing"):
            self.routing.labels(reason=bounded(attempt["routing"], ROUTING_REASONS)).inc()

    def build_finished(self, record: dict[str, Any]) -> None:
        """Count a finished build and observe its phases and steps."""
        outcome = bounded(record.get("state"), BUILD_OUTCOMES)
        self.builds.labels(outcome=outcome).inc()
        for phase, seconds in (record.get("phases") or {}).items():
            self.phase_seconds.labels(phase=bounded(phase, PHASE_LABELS), outcome=outcome).observe(seconds)
        steps = record.get("steps") or {}
        if steps.get("cached"):
            self.steps.labels(kind="cached").inc(steps["cached"])
        if steps.get("executed"):
            self.steps.labels(kind="executed").inc(steps["executed"])
        for flag in (record.get("explain") or {}).get("flagged") or ():
            self.slow_phases.labels(phase=bounded(flag.get("phase"), SLOW_PHASE_LABELS)).inc()

    def cache_export(self, outcome: str) -> None:
        """Count one build's cache export: exported | failed | skipped | skipped_newer | skipped_busy."""
        self.cache_exports.labels(outcome=bounded(outcome, EXPORT_OUTCOMES)).inc()

    def superseded_build(self, was: str) -> None:
        """Count a build a newer job of its supersede_key cancelled, by where it was."""
        self.superseded.labels(was=bounded(was, SUPERSEDED_WHERE)).inc()


class NoMetrics:
    """What a worker without ``BUILDQ_METRICS_PORT`` records: nothing."""

    def in_progress_inc(self) -> None:
        pass

    def in_progress_dec(self) -> None:
        pass

    def attempt_finished(self, attempt: dict[str, Any]) -> None:
        pass

    def build_finished(self, record: dict[str, Any]) -> None:
        pass

    def cache_export(self, outcome: str) -> None:
        pass

    def superseded_build(self, was: str) -> None:
        pass


class DaemonUpCollector:
    """``buildq_daemon_up{daemon}``: 1 while the daemon's circuit breaker is closed, read from Redis
    at each scrape (the deployment's view, the same on every worker)."""

    def __init__(self, health: DaemonHealth, daemons: Sequence[str]) -> None:
        self.health, self.daemons = health, list(daemons)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "buildq_daemon_up", "BuildKit daemon answering (1) or down (0)", labels=["daemon"]
        )
        for state in self.health.states(self.daemons):
            gauge.add_metric([state.daemon], 1.0 if state.up else 0.0)
        yield gauge


class MainMetrics:
    """The metric objects of the worker's main process (made there, after the multiprocess
    directory is prepared): what its janitor did."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter

        self.janitor_requeues = Counter(
            "buildq_janitor_requeues",
            "Build messages the janitor put back (lost by the broker, or left by a worker that went away)",
            registry=registry,
        )

    def janitor_requeued(self, n: int) -> None:
        if n:
            self.janitor_requeues.inc(n)


#: a snapshot older than this is not served (the gauges' age still is)
GAUGES_STALE_AFTER_S = 60.0


class DeploymentGauges:
    """The deployment's queue gauges, served from the last snapshot this worker read
    (:func:`buildq.store.gauges.read_gauges`, refreshed by the main process every few seconds): a
    scrape makes no Redis round trip. Every worker serves the same values (query them with
    ``max``). Label values are the queues and daemons of the deployment's settings."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: tuple[GaugeRead, float] | None = None

    def update(self, read: GaugeRead) -> None:
        """A new read (from :func:`~buildq.store.gauges.read_gauges`)."""
        self._last = (read, self.clock())

    def age(self) -> float | None:
        """Seconds since the served snapshot was computed (None: no snapshot yet)."""
        last = self._last
        if last is None or last[0].snapshot is None:
            return None
        read, at = last
        assert read.snapshot is not None
        return max(0.0, read.now - read.snapshot.at) + max(0.0, self.clock() - at)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        age = self.age()
        if age is None or self._last is None:
            return
        snap = self._last[0].snapshot
        assert snap is not None
        yield GaugeMetricFamily(
            "buildq_gauges_age_seconds", "Seconds since the queue gauges were computed", value=age
        )
        if age > GAUGES_STALE_AFTER_S:
            return
        depth = GaugeMetricFamily(
            "buildq_queue_depth", "Build messages waiting in the queue", labels=["queue"]
        )
        for queue, n in sorted(snap.queues.items()):
            depth.add_metric([queue], n)
        yield depth
        yield GaugeMetricFamily(
            "buildq_queue_oldest_age_seconds",
            "How long the oldest job that is due and not yet running has waited",
            value=snap.oldest_queued_s,
        )
        in_use = GaugeMetricFamily(
            "buildq_daemon_slots_in_use", "Builds holding a slot on the daemon", labels=["daemon"]
        )
        slots = GaugeMetricFamily(
            "buildq_daemon_slots", "Build slots of the daemon (BUILDQ_BUILDKIT_MAX_BUILDS)", labels=["daemon"]
        )
        for daemon, n in sorted(snap.slots.items()):
            in_use.add_metric([daemon], n)
            slots.add_metric([daemon], snap.limit)
        yield in_use
        yield slots
        yield GaugeMetricFamily(
            "buildq_builds_running", "Builds running in the deployment (slots in use)", value=snap.running
        )
        yield GaugeMetricFamily("buildq_daemons_full", "Daemons whose every slot is in use", value=snap.full)
        yield GaugeMetricFamily("buildq_workers_live", "Live workers (heartbeats)", value=snap.workers)
        yield GaugeMetricFamily(
            "buildq_jobs_waiting_for_daemon",
            "Jobs back in the queue because every daemon was full or down",
            value=snap.waiting_for_daemon,
        )


def serve_metrics(port: int, *collectors: Any, addr: str = "0.0.0.0") -> Any:
    """Serve the aggregated samples of all pool processes (and ``collectors``) on ``port`` (main process)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)
    return start_http_server(port, addr=addr, registry=registry)


def reap_dead_gauges() -> list[int]:
    """Drop the live gauges of pool processes that are gone without saying so (SIGKILL, OOM kill):
    their pids, from the multiprocess directory's file names. Counters of a dead process stay."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return []
    dead = set()
    for name in os.listdir(directory):
        if name.startswith("gauge_live") and name.endswith(".db"):
            number = name.rsplit("_", 1)[-1].removesuffix(".db")
            if number.isdigit() and not os.path.exists(f"/proc/{number}"):
                dead.add(int(number))
    for pid in sorted(dead):
        mark_process_dead(pid)
    return sorted(dead)


def mark_process_dead(pid: int) -> None:
    """Drop a dead pool process's live gauges (called when a child exits)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
