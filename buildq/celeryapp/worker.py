"""Worker entry point and per-process runtime.

``buildq worker`` builds the settings once, creates the app with the ``buildq.build`` task
(:func:`create_worker_app`) and starts a Celery worker with task events on. Each pool process makes
its :class:`~buildq.engine.service.BuildService` once (first task after fork), never per task; the
task reaches it through ``app.buildq_runtime``. At start the main process removes buildctl
processes/containers left by dead workers (their job lease has expired) and starts the janitor.
Signal handlers are connected by :func:`run_worker`, not at import.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from celery import Celery
from celery.signals import worker_process_shutdown, worker_ready, worker_shutting_down

from ..config import Settings
from ..engine.metrics import mark_process_dead, prepare_multiprocess_dir, serve_metrics
from ..engine.runtime import make_service
from ..engine.service import BuildService
from ..store.janitor import start_janitor
from .app import create_app
from .events import PhaseEvents
from .task import register

log = logging.getLogger("buildq.worker")

T = TypeVar("T")


class PerProcess(Generic[T]):
    """A value made on first use in each process: after a fork the child makes its own."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._made: tuple[int, T] | None = None

    def get(self) -> T:
        made = self._made
        if made is None or made[0] != os.getpid():
            with self._lock:
                made = self._made
                if made is None or made[0] != os.getpid():
                    made = self._made = (os.getpid(), self._factory())
        return made[1]

    def made_here(self) -> T | None:
        """The value if this process made it already, else None (nothing is made)."""
        made = self._made
        return made[1] if made is not None and made[0] == os.getpid() else None


class WorkerRuntime:
    """This worker's per-process objects, reached through the app (``app.buildq_runtime``)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._service = PerProcess(lambda: make_service(settings))
        self._events = PerProcess(lambda: PhaseEvents(app, self.service().ticker))

    def service(self) -> BuildService:
        return self._service.get()

    def events(self) -> PhaseEvents:
        return self._events.get()

    def flush_events(self) -> None:
        """Publish the phase events this process still buffers (it is stopping)."""
        events = self._events.made_here()
        if events is not None:
            events.flush()

    def close_launcher(self) -> None:
        """Release this process's launcher (the docker launcher's warm container): it is stopping."""
        service = self._service.made_here()
        if service is not None:
            service.launcher.close()


def create_worker_app(settings: Settings) -> Celery:
    """The app with ``buildq.build`` registered and this worker's runtime attached."""
    app = create_app(settings)
    register(app)
    app.buildq_runtime = WorkerRuntime(app, settings)
    return app


def reap_orphans(service: BuildService) -> list[str]:
    """Kill leftover buildctl runs whose job lease has expired; return their job ids."""
    reaped = []
    try:
        job_ids = service.launcher.find_orphans()
    except Exception as exc:  # noqa: BLE001 - the engine may be down; the worker still starts
        log.warning("could not list leftover buildctl runs: %s", exc)
        return []
    for job_id in job_ids:
        if service.store.lease_holder(job_id) is None:
            service.launcher.kill_orphan(job_id)
            reaped.append(job_id)
    if reaped:
        log.warning("removed %d leftover buildctl run(s): %s", len(reaped), ", ".join(reaped))
    return reaped


def _connect_signals(app: Celery, settings: Settings) -> None:
    """The worker's signal handlers (strong references: they are closures)."""
    runtime: WorkerRuntime = app.buildq_runtime

    def on_ready(sender: object = None, **_: object) -> None:
        if getattr(sender, "app", None) is not app:
            return
        if settings.metrics_port is not None:
            serve_metrics(settings.metrics_port)
            log.info("serving Prometheus metrics on :%d/metrics", settings.metrics_port)
        service = runtime.service()
        reap_orphans(service)
        after = settings.requeue_lost_after_s
        start_janitor(service.store, after_s=after, every_s=max(0.5, after / 2))

    def on_process_shutdown(pid: int | None = None, **_: object) -> None:
        runtime.flush_events()  # phase events still buffered
        runtime.close_launcher()
        mark_process_dead(pid or os.getpid())

    def on_shutting_down(sig: str = "", how: str = "", exitcode: int = 0, **_: object) -> None:
        """Warm shutdown lets running builds finish, for at most ``BUILDQ_SHUTDOWN_GRACE_S``.

        After the grace the worker escalates to a cold shutdown: pool processes (and their
        buildctl, killed by the next owner of the job's lease) stop, and the unacknowledged
        messages go back to the queue, so the builds run again elsewhere instead of being lost.
        """
        if how != "Warm":
            return
        grace = settings.shutdown_grace_s

        def escalate() -> None:
            log.warning("builds still running after %.0fs of warm shutdown: cold shutdown", grace)
            os.kill(os.getpid(), signal.SIGQUIT)

        timer = threading.Timer(grace, escalate)
        timer.daemon = True
        timer.start()

    worker_ready.connect(on_ready, weak=False)
    worker_process_shutdown.connect(on_process_shutdown, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)


def worker_argv(
    settings: Settings,
    *,
    queues: Sequence[str] = (),
    concurrency: int | None = None,
    autoscale: str | None = None,
    pool: str | None = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``celery worker`` argv for these options (events on, late acks from the app config)."""
    argv = ["worker", "--events", f"--loglevel={loglevel}"]
    argv.append("--queues=" + ",".join(queues or [settings.high_priority_queue, settings.queue]))
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if autoscale:
        argv.append(f"--autoscale={autoscale}")
    if pool:
        argv.append(f"--pool={pool}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    argv.append("--without-gossip")
    argv.append("--without-mingle")
    argv.extend(extra)
    return argv


def run_worker(settings: Settings, argv: list[str]) -> None:
    """Start a Celery worker in this process (blocks until it stops)."""
    if settings.metrics_port is not None:
        # before prometheus_client's values are made: pool processes write samples to this dir
        prepare_multiprocess_dir(settings.metrics_dir)
    app = create_worker_app(settings)
    _connect_signals(app, settings)
    app.worker_main(argv)
