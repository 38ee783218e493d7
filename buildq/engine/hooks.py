"""Side effects of a build's lifecycle, as middleware with named hook methods (dramatiq's way).

The lifecycle (:mod:`buildq.engine.lifecycle`) decides; the hooks here react at named points and
never decide anything. Each is one concern:

- :class:`MetricsHook`: Prometheus counters and histograms (the metric objects are at the end of
  this module);
- :class:`BreakerHook`: opens a daemon's circuit breaker when buildctl could not dial it;
- :class:`BaselineHook`: a build that succeeded in one attempt joins its repository's baseline
  (what the next builds' ``explain`` compares with);
- :class:`AffinityHook`: remembers the daemon a build succeeded on, for its cache.

:class:`Hooks` calls them in order, once per ending (:meth:`Hooks.ended`): what a hook adds to the
write that ends the attempt (:class:`EndWrites`) is stored in the same round trip as the record or
the requeue; ``finished`` runs once the record is stored.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..buildkit.classify import DAEMON_STATE_REASONS
from ..store.daemons import DaemonHealth
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
# Metrics:
# - ``buildq_build_phase_seconds{phase}``: histogram, one observation per phase per finished build
# - ``buildq_builds_total{outcome}``: succeeded | failed | cancelled
# - ``buildq_build_attempts_total{outcome,reason}``: every attempt, with the classifier's reason
# - ``buildq_build_steps_total{kind}``: cached | executed Dockerfile steps
# - ``buildq_cache_exports_total{outcome}``: builds that asked for a registry cache export, by what
#   the evidence says: exported | failed (buildctl may still exit 0) | skipped (ended before it)
# - ``buildq_builds_in_progress``: attempts running now (summed over live processes)
# - ``buildq_daemon_up{daemon}``: 1 while the daemon answers, 0 while its circuit breaker is open
# - ``buildq_routing_total{reason}``: attempts launched on a daemon, by why that daemon
#   (affinity | least_loaded | fallback)
# - ``buildq_slow_phases_total{phase}``: phases the record's ``explain`` flagged (``step`` for a step)
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
            "Seconds per build phase",
            ["phase"],
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
        self.routing = Counter(
            "buildq_routing", "Attempts launched on a daemon, by why that daemon", ["reason"], **kwargs
        )
        self.slow_phases = Counter(
            "buildq_slow_phases_total", "Phases flagged as unusually slow", ["phase"], **kwargs
        )
        self.in_progress = Gauge(
            "buildq_builds_in_progress", "Build attempts running", multiprocess_mode="livesum", **kwargs
        )

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
            outcome=attempt.get("outcome") or "unknown", reason=attempt.get("reason") or "none"
        ).inc()
        if attempt.get("routing"):
            self.routing.labels(reason=attempt["routing"]).inc()

    def build_finished(self, record: dict[str, Any]) -> None:
        """Count a finished build and observe its phases and steps."""
        self.builds.labels(outcome=record.get("state") or "unknown").inc()
        for phase, seconds in (record.get("phases") or {}).items():
            self.phase_seconds.labels(phase=phase).observe(seconds)
        steps = record.get("steps") or {}
        if steps.get("cached"):
            self.steps.labels(kind="cached").inc(steps["cached"])
        if steps.get("executed"):
            self.steps.labels(kind="executed").inc(steps["executed"])
        for flag in (record.get("explain") or {}).get("flagged") or ():
            self.slow_phases.labels(phase=flag["phase"]).inc()

    def cache_export(self, outcome: str) -> None:
        """Count one build's cache export: exported | failed | skipped."""
        self.cache_exports.labels(outcome=outcome).inc()


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
