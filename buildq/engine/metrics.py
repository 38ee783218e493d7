"""Prometheus metrics of a worker (``prometheus_client`` multiprocess mode for the prefork pool).

``prepare_multiprocess_dir`` must run in the worker's main process *before* ``prometheus_client``
is imported anywhere (the library picks its value class at import time); the CLI does this.
Each pool process then writes its samples to mmap files in that directory, and
``serve_metrics`` (main process) aggregates them on ``BUILDQ_METRICS_PORT``.

Metrics:
- ``buildq_build_phase_seconds{phase}``: histogram, one observation per phase per finished build
- ``buildq_builds_total{outcome}``: succeeded | failed | cancelled
- ``buildq_build_attempts_total{outcome,reason}``: every attempt, with the classifier's reason
- ``buildq_build_steps_total{kind}``: cached | executed Dockerfile steps
- ``buildq_cache_exports_total{outcome}``: builds that asked for a registry cache export, by what
  the evidence says: exported | failed (buildctl may still exit 0) | skipped (ended before it)
- ``buildq_builds_in_progress``: attempts running now (summed over live processes)
- ``buildq_daemon_up{daemon}``: 1 while the daemon answers, 0 while its circuit breaker is open
- ``buildq_routing_total{reason}``: attempts launched on a daemon, by why that daemon
  (affinity | least_loaded | fallback)
- ``buildq_slow_phases_total{phase}``: phases the record's ``explain`` flagged (``step`` for a step)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from ..store.daemons import DaemonHealth

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
    """The metric objects of one process (made once, at worker process start)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        kwargs = {"registry": registry} if registry is not None else {}
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

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """``buildq_builds_in_progress`` is one higher inside, whatever way the block is left."""
        self.in_progress.inc()
        try:
            yield
        finally:
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

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        yield

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


def mark_process_dead(pid: int) -> None:
    """Drop a dead pool process's live gauges (called when a child exits)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
