"""Worker entry point and per-process runtime.

``buildq worker`` builds the settings once, creates the Celery app and starts a worker with task
events on. Each worker process builds its :class:`BuildService` once (first task after fork),
never per task. At start the main process removes buildctl processes/containers left by dead
workers (their job lease has expired).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutting_down

from .capacity import DaemonSlots
from .config import Settings
from .service import BuildService
from .state import JobStore

log = logging.getLogger("buildq.worker")

_lock = threading.Lock()
_services: dict[tuple[int, int], BuildService] = {}


def make_service(settings: Settings) -> BuildService:
    """The build runtime for this process (launcher, Redis store, log store, metrics)."""
    from .launchers import make_launcher
    from .logs import LogStore

    store = JobStore.from_url(settings.state_redis_url, result_ttl_s=settings.result_ttl_s)
    metrics = None
    if settings.metrics_port is not None:
        from .metrics import BuildMetrics

        metrics = BuildMetrics()
    return BuildService(
        settings=settings,
        launcher=make_launcher(settings),
        store=store,
        slots=DaemonSlots(store.redis, limit=settings.buildkit_max_builds),
        logs=LogStore(store.redis, maxlen=settings.log_stream_maxlen, ttl_s=settings.log_stream_ttl_s),
        metrics=metrics,
    )


def service_for(app: Celery) -> BuildService:
    """This process's service for ``app`` (made on first use after fork, then reused)."""
    key = (id(app), os.getpid())
    service = _services.get(key)
    if service is None:
        with _lock:
            service = _services.get(key)
            if service is None:
                service = make_service(app.buildq_settings)
                _services[key] = service
    return service


@worker_process_init.connect
def _forget_parent_runtime(**_: object) -> None:
    # a forked child must not reuse the parent's connections or docker client
    _services.clear()


@worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_: object) -> None:
    from .events import flush_all
    from .metrics import mark_process_dead

    flush_all()  # phase events still buffered
    mark_process_dead(pid or os.getpid())


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


@worker_ready.connect
def _on_ready(sender: object = None, **_: object) -> None:
    app = getattr(sender, "app", None)
    if app is None or not hasattr(app, "buildq_settings"):
        return
    settings: Settings = app.buildq_settings
    if settings.metrics_port is not None:
        from .metrics import serve_metrics

        serve_metrics(settings.metrics_port)
        log.info("serving Prometheus metrics on :%d/metrics", settings.metrics_port)
    service = service_for(app)
    reap_orphans(service)
    from .janitor import start_janitor

    start_janitor(
        service.store,
        after_s=settings.requeue_lost_after_s,
        every_s=max(0.5, settings.requeue_lost_after_s / 2),
    )


@worker_shutting_down.connect
def _bound_warm_shutdown(sig: str = "", how: str = "", exitcode: int = 0, **_: object) -> None:
    """Warm shutdown lets running builds finish, for at most ``BUILDQ_SHUTDOWN_GRACE_S``.

    After the grace the worker escalates to a cold shutdown: pool processes (and their buildctl,
    killed by the next owner of the job's lease) stop, and the unacknowledged messages go back
    to the queue, so the builds run again elsewhere instead of being lost.
    """
    if how != "Warm" or _grace_s is None:
        return
    import signal

    def escalate() -> None:
        log.warning("builds still running after %.0fs of warm shutdown: cold shutdown", _grace_s)
        os.kill(os.getpid(), signal.SIGQUIT)

    timer = threading.Timer(_grace_s, escalate)
    timer.daemon = True
    timer.start()


_grace_s: float | None = None


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
    from .app import create_app

    if settings.metrics_port is not None:
        from .metrics import prepare_multiprocess_dir

        # before anything imports prometheus_client: pool processes write samples to this dir
        prepare_multiprocess_dir(settings.metrics_dir)
    app = create_app(settings)
    global _grace_s
    _grace_s = settings.shutdown_grace_s
    app.worker_main(argv)
