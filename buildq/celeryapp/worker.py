"""Worker entry point: the app with its task, and what each process of a worker makes and releases.

``buildq worker`` builds the settings once, creates the app with the ``buildq.build`` task
(:func:`create_worker_app`) and starts a Celery worker with task events on. Every pool process
makes its own runtime (:class:`~buildq.engine.runtime.PoolRuntime`: store, launcher, scheduler,
metrics, the warm container) in that process after the fork, when Celery sends
``worker_process_init`` — the same way for the first child and for every later one (``--autoscale``,
``pool_grow``, ``--max-tasks-per-child``, a child replaced after a crash) — and releases it at
``worker_process_shutdown``. The main process makes only its own
(:class:`~buildq.engine.runtime.MainRuntime`: janitor, daemon watch, leftovers) at ``worker_ready``,
and serves the metrics of all its pool processes. Signal handlers are connected by
:func:`run_worker`, not at import.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.exceptions
from celery import Celery
from celery.signals import (
    task_postrun,
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker.consumer import Consumer

from ..config import Settings
from ..engine.hooks import DaemonUpCollector, mark_process_dead, prepare_multiprocess_dir, serve_metrics
from ..engine.runtime import MainRuntime, check_state_folder
from .app import create_app
from .jsonlog import install_json_logging
from .task import DAEMON_UP_EVENT, WorkerProcesses, register

log = logging.getLogger("buildq.worker")

#: a pool process whose runtime cannot be made waits this long before it exits (Celery replaces it)
PAUSE_BEFORE_EXIT_S = 5.0


class EventBatchingConsumer(Consumer):
    """Celery's consumer, publishing its buffered task events at most every ``BUILDQ_EVENT_BATCH_S``.

    Celery buffers task events (``task-received``, ``-started``, ``-succeeded``…: what Flower
    shows) and publishes them at the next turn of its event loop: a build's three events went out
    as three messages, three Redis commands a build of the ~40 buildq needs. Here the first
    buffered event schedules one flush ``BUILDQ_EVENT_BATCH_S`` (0.1 s) later, which carries every
    event of every build meanwhile: at a few builds a second one or two messages a build, under
    load one per 0.1 s per worker whatever the number of builds. Flower sees a state change up to
    that much later. Celery still flushes what is buffered when its connection or the worker
    closes; 0 keeps Celery's own behaviour."""

    _flush_due = False

    def on_send_event_buffered(self) -> None:
        batch_s = self.app.buildq_settings.event_batch_s
        if self.hub is None or batch_s <= 0:
            super().on_send_event_buffered()
        elif not self._flush_due:
            self._flush_due = True
            self.hub.call_later(batch_s, self._flush_batch)

    def _flush_batch(self) -> None:
        self._flush_due = False
        self._flush_events()


def create_worker_app(settings: Settings) -> Celery:
    """The app with ``buildq.build`` registered and this worker's processes attached."""
    survive_restore_on_a_lost_connection()
    book_deliveries_without_transactions()
    app = create_app(settings)
    app.conf.worker_consumer = f"{__name__}:EventBatchingConsumer"
    register(app)
    app.buildq_worker = WorkerProcesses(app, settings)
    return app


def survive_restore_on_a_lost_connection() -> None:
    """Keep the worker alive when its broker connection dies with messages delivered to it.

    When the connection to Redis is lost (a Sentinel failover, a restart), Celery closes the
    channel, and kombu's Redis transport tries to hand back the messages it delivered
    (``QoS.restore_unacked``) through that same, torn-down connection: ``_connparams`` reads the
    connection's ``client``, which is None by then, and the ``AttributeError`` ends the worker
    ("Unrecoverable error", kombu issues #582 and #970; kombu 5.7 still does it). The same happens
    later when a build that was running meanwhile ends and its message is acknowledged (or
    rejected) on the old channel (``QoS.ack``/``QoS.reject``). Here each of those is skipped with a
    warning instead: the messages stay in kombu's ``unacked`` hash; a message whose job has its
    record is dropped when it comes back, one whose worker is gone is put back by the janitor (or by
    kombu's visibility timeout). Applied once per process."""
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import base as virtual

    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, "_buildq", False):
        return
    restore, ack, reject = qos.restore_unacked, qos.ack, qos.reject

    def restore_unacked(self: kombu_redis.QoS, client: object = None) -> object:
        try:
            return restore(self, client)
        except AttributeError as exc:  # the connection is gone: see above
            log.warning("delivered messages not handed back on a lost broker connection (%s); "
                        "they stay unacknowledged for the janitor", exc)  # fmt: skip
            return None

    def on_a_lost_channel(what: str, self: kombu_redis.QoS, delivery_tag: str, exc: Exception) -> None:
        log.warning("message %s not %s on a lost broker connection (%s); it stays unacknowledged "
                    "for the janitor", delivery_tag, what, exc)  # fmt: skip
        virtual.QoS.ack(self, delivery_tag)  # this channel's own bookkeeping only

    def ack_(self: kombu_redis.QoS, delivery_tag: str) -> None:
        try:
            ack(self, delivery_tag)
        except AttributeError as exc:
            on_a_lost_channel("acknowledged", self, delivery_tag, exc)

    def reject_(self: kombu_redis.QoS, delivery_tag: str, requeue: bool = False) -> None:
        try:
            reject(self, delivery_tag, requeue)
        except AttributeError as exc:
            on_a_lost_channel("rejected", self, delivery_tag, exc)

    restore_unacked._buildq = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked  # type: ignore[method-assign]
    qos.ack = ack_  # type: ignore[method-assign]
    qos.reject = reject_  # type: ignore[method-assign]


def book_deliveries_without_transactions() -> None:
    """Record and forget each delivered message with two plain commands instead of four.

    kombu's Redis transport keeps every delivered, unacknowledged message in its ``unacked`` hash
    and ``unacked_index`` (``QoS.append`` on delivery, ``QoS.ack``/``QoS.reject`` after), each time
    in a MULTI/EXEC transaction: 8 commands per build, a fifth of all buildq does per build. Both
    are still sent in one pipeline here, without MULTI/EXEC. Nothing reads the two entries as a
    pair in between: kombu's own restore reads the index, then the hash, and skips a tag missing
    from the hash; the janitor reads only entries seconds old (``buildq.store.janitor``). A Redis
    crash between the two commands leaves either a tag nothing restores (the message is then
    found lost by the janitor, as one lost between ``BRPOP`` and the record is) or a hash entry
    whose index entry was already gone (unread, as after an ack). Applied once per process."""
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    if getattr(qos.pipe_or_acquire, "_buildq", False):
        return

    @contextmanager
    def pipe_or_acquire(self: kombu_redis.QoS, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as client:
                yield client.pipeline(transaction=False)

    pipe_or_acquire._buildq = True  # type: ignore[attr-defined]
    qos.pipe_or_acquire = pipe_or_acquire  # type: ignore[method-assign]


_GRACE_STARTED: list[threading.Timer] = []


def start_grace(grace: float) -> None:
    """A warm shutdown lets running builds finish, for at most ``grace`` seconds
    (``BUILDQ_SHUTDOWN_GRACE_S``), however it was asked for (SIGTERM, ``celery control shutdown``).

    After the grace the worker escalates to a cold shutdown: pool processes (and their buildctl,
    killed by their host's reaper or the next owner of the job's claim) stop, and the
    unacknowledged messages go back to the queue, so the builds run again elsewhere instead of
    being lost. Started once per process.
    """
    if _GRACE_STARTED:
        return

    def escalate() -> None:
        log.warning("builds still running after %.0fs of warm shutdown: cold shutdown", grace)
        os.kill(os.getpid(), signal.SIGQUIT)

    timer = threading.Timer(grace, escalate)
    timer.daemon = True
    timer.start()
    _GRACE_STARTED.append(timer)


def register_remote_shutdown(grace: float) -> None:
    """``celery control shutdown`` is a warm shutdown with the same grace as SIGTERM (Celery's own
    command waits for running tasks without a limit)."""
    from celery.exceptions import WorkerShutdown
    from celery.platforms import EX_OK
    from celery.worker.control import control_command

    @control_command(name="shutdown")
    def shutdown(state: object, msg: str = "Got shutdown from remote", **_: object) -> None:
        """Shutdown worker(s) (warm, for at most BUILDQ_SHUTDOWN_GRACE_S)."""
        log.warning("%s: warm shutdown, for at most %.0fs", msg, grace)
        start_grace(grace)
        raise WorkerShutdown(EX_OK)


def _connect_signals(app: Celery, settings: Settings) -> None:
    """The worker's signal handlers (strong references: they are closures)."""
    processes: WorkerProcesses = app.buildq_worker

    def on_process_init(**_: object) -> None:
        try:
            processes.start_pool_process()
        except Exception:  # this process cannot build: it never takes a job, Celery starts another
            log.exception("pool process %d cannot start its runtime; it exits", os.getpid())
            time.sleep(PAUSE_BEFORE_EXIT_S)  # not a tight loop of failing processes
            os._exit(70)

    def on_task_received(request: object = None, **_: object) -> None:
        """A retry waiting out its backoff is held here until its ETA: say so, so the janitor can
        put it back once this worker's heartbeat is gone (and not before)."""
        main = processes.main
        task_id, eta = getattr(request, "id", None), getattr(request, "eta", None)
        if main is None or not eta or not isinstance(task_id, str):
            return
        try:
            main.store.held_by(task_id, main.worker)
        except Exception as exc:  # noqa: BLE001 - the janitor's fallback (the ETA long past) remains
            log.info("job %s: holder not written: %s", task_id, exc)

    def on_task_postrun(**_: object) -> None:
        if processes.exit_after_task:  # a broken process ends after its task
            os._exit(70)

    def on_process_shutdown(pid: int | None = None, **_: object) -> None:
        processes.stop_pool_process()
        mark_process_dead(pid or os.getpid())

    def on_ready(sender: object = None, **_: object) -> None:
        if id(getattr(sender, "app", None)) != id(app):  # another app of this process
            return
        hostname = getattr(sender, "hostname", None) or "buildq"

        def announce(daemon: str, seconds_down: float) -> None:
            try:
                with app.events.default_dispatcher(hostname=hostname) as dispatcher:
                    dispatcher.send(DAEMON_UP_EVENT, daemon=daemon, seconds_down=round(seconds_down, 3))
            except Exception as exc:  # noqa: BLE001 - best effort
                log.warning("daemon event not sent: %s", exc)

        consumer = getattr(sender, "task_consumer", None)
        queues = [str(q.name) for q in getattr(consumer, "queues", None) or ()]
        main = processes.main = MainRuntime(settings, announce=announce, node=hostname, queues=queues)
        if settings.metrics_port is not None:
            up = DaemonUpCollector(main.health, settings.daemons)
            serve_metrics(settings.metrics_port, up, main.gauges)
            log.info("serving Prometheus metrics on :%d/metrics", settings.metrics_port)
        main.start()

    def on_shutdown(**_: object) -> None:
        if processes.main is not None:
            processes.main.close()

    def on_shutting_down(sig: str = "", how: str = "", exitcode: int = 0, **_: object) -> None:
        if how == "Warm":
            start_grace(settings.shutdown_grace_s)

    worker_process_init.connect(on_process_init, weak=False)
    task_postrun.connect(on_task_postrun, weak=False)
    task_received.connect(on_task_received, weak=False)
    worker_process_shutdown.connect(on_process_shutdown, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
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
    """The ``celery worker`` argv for these options (events on, late acks from the app config; with
    ``BUILDQ_LOG_FORMAT=json`` no banner: every line of the log is JSON)."""
    argv = ["--quiet"] if settings.log_format == "json" else []
    argv += ["worker", "--events", f"--loglevel={loglevel}"]
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


class PersistenceRefused(Exception):
    """``BUILDQ_REDIS_PERSISTENCE=require`` and Redis keeps no append-only file."""


def check_persistence(settings: Settings) -> None:
    """Say how the state Redis keeps its data (``BUILDQ_REDIS_PERSISTENCE``): raise
    :class:`PersistenceRefused` with the reason under ``require``, log a warning under ``warn``."""
    if settings.redis_persistence == "ignore":
        return
    from ..store.connect import persistence_problem, redis_client

    client = redis_client(settings, socket_timeout=5)
    try:
        problem = persistence_problem(client)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.warning("Redis did not answer at start (%s); its persistence is not checked", exc)
        return
    finally:
        client.close()
    if problem is None:
        return
    if settings.redis_persistence == "require":
        raise PersistenceRefused(f"{problem} (BUILDQ_REDIS_PERSISTENCE=require)")
    log.warning("%s; set appendonly yes (docs: operating) or BUILDQ_REDIS_PERSISTENCE=ignore", problem)


def run_worker(settings: Settings, argv: list[str]) -> None:
    """Start a Celery worker in this process (blocks until it stops)."""
    check_state_folder(settings)
    check_persistence(settings)
    if settings.metrics_port is not None:
        # before prometheus_client's values are made: pool processes write samples to this dir
        prepare_multiprocess_dir(settings.metrics_dir)
    if settings.log_format == "json":
        install_json_logging()
    app = create_worker_app(settings)
    _connect_signals(app, settings)
    register_remote_shutdown(settings.shutdown_grace_s)
    app.worker_main(argv)
