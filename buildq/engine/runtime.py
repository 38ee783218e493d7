"""What a worker's processes run on, made from the settings in the process that uses it.

:class:`PoolRuntime` is one pool process's: its Redis client and store, its launcher, its
scheduler, its metrics and hooks, its cancel subscription and its :class:`~buildq.engine.lifecycle.Lifecycle`.
It is made in that process after the fork (Celery's ``worker_process_init``), the same way for the
first pool process and for every later one (a grown pool, a replaced child), and closed when the
process ends. :class:`MainRuntime` is the worker main process's: the janitor, the daemon watch and
the reaping of leftovers, on its own scheduler. Nothing here is made at import time.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Settings
from ..contract.grants import granted_values
from ..launchers import make_launcher
from ..launchers.base import Launcher
from ..store.archive import Archive
from ..store.connect import redis_client
from ..store.daemons import DaemonHealth
from ..store.gauges import read_gauges
from ..store.janitor import Janitor
from ..store.jobs import JobStore
from ..store.keys import CANCELS_CHANNEL
from ..store.logs import LogStore
from ..store.scripts import replicas_for
from .daemonwatch import Announce, DaemonWatch
from .hooks import (
    MULTIPROC_ENV,
    AffinityHook,
    BaselineHook,
    BreakerHook,
    BuildMetrics,
    DeploymentGauges,
    Hooks,
    LogHook,
    MainMetrics,
    MetricsHook,
    NoMetrics,
    reap_dead_gauges,
)
from .lifecycle import Lifecycle
from .runner import CANCELLED, RunRegistry, Stopper, stale
from .scheduler import Scheduler

log = logging.getLogger("buildq.worker")

#: how often the main process looks for what dead or replaced pool processes left behind
REAP_EVERY_S = 30.0
#: a worker's heartbeat: written this often, it lives three times as long
HEARTBEAT_EVERY_S = 2.0
#: how often a worker serving metrics reads (or, holding the lease, computes) the queue gauges;
#: the lease outlives three of these
GAUGES_EVERY_S = 5.0


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: how long a write made on a scheduler thread (renewals, log flushes, heartbeats, the janitor) waits
#: for Redis before it gives up until its next turn: the thread serves every build of the process
QUICK_PATIENCE_S = 2.0


def make_store(settings: Settings, *, quick: bool = False) -> JobStore:
    """A store on the state Redis (plain or through Sentinel) that waits ``BUILDQ_REDIS_RETRY_S``
    for Redis, or, ``quick``, at most :data:`QUICK_PATIENCE_S` (for the scheduler's periodic work)."""
    patience = min(QUICK_PATIENCE_S, settings.redis_retry_s) if quick else None
    client = redis_client(settings, patience_s=patience, socket_timeout=10, health_check_interval=30)
    return JobStore(client, result_ttl_s=settings.result_ttl_s, replicas=replicas_for(settings, client))


class CancelListener:
    """The process's one subscription to cancel notices: a notice for a build this process runs
    stops it at once (the lease renewal re-checks the flag as the fallback). Called by the
    scheduler whenever it is idle; returns the socket to wait on."""

    def __init__(self, client: Any, stoppers: dict[str, Stopper]) -> None:
        self.client, self.stoppers = client, stoppers
        self._pubsub: Any = None

    def __call__(self, timeout: float) -> Any:
        if self._pubsub is None:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CANCELS_CHANNEL)
            self._pubsub = pubsub
        try:
            while True:
                message = self._pubsub.get_message(timeout=0)
                if message is None:
                    break
                data = message.get("data")
                job_id = data.decode() if isinstance(data, bytes) else str(data)
                stopper = self.stoppers.get(job_id)
                if stopper is not None:
                    log.info("job %s: cancel notice received; stopping its build", job_id)
                    stopper.stop(CANCELLED)
            connection = self._pubsub.connection
            return connection._sock if connection is not None else None
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - it is going anyway
                pass


def check_state_folder(settings: Settings) -> None:
    """Refuse to start (:class:`~buildq.errors.SettingsError`) unless the launcher's state folder is
    the worker's own (made if missing): pid files, run files and the docker launcher's FIFOs are
    written there as this user."""
    from ..launchers.local import default_state_dir, private_folder

    if settings.launcher == "local":
        private_folder(settings.local_state_dir or default_state_dir(), "BUILDQ_LOCAL_STATE_DIR")
    else:
        private_folder(default_state_dir(name="buildq-docker"), "BUILDQ_LAUNCHER=docker")


def run_registry(launcher: Launcher) -> RunRegistry:
    """The run files of ``launcher``'s host: ``runs/`` in its state folder."""
    return RunRegistry(Path(str(getattr(launcher, "state_dir", tempfile.gettempdir()))) / "runs")


def launcher_domain(launcher: Launcher) -> str:
    """Where ``launcher``'s runs can be killed from (its ``domain``, else this host)."""
    return str(getattr(launcher, "domain", None) or socket.gethostname())


class PoolRuntime:
    """One pool process's runtime (make it in that process)."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.settings = settings
        self.store = make_store(settings)
        #: the same Redis for what the scheduler's thread writes: it must never wait long
        self.quick = make_store(settings, quick=True)
        client = self.quick.redis
        self.scheduler = Scheduler()
        self.launcher = make_launcher(settings)
        self.metrics: BuildMetrics | NoMetrics = (
            BuildMetrics() if settings.metrics_port is not None else NoMetrics()
        )
        hooks = [
            MetricsHook(self.metrics),
            BreakerHook(DaemonHealth(client), time.time, hold_s=settings.daemon_hold_s),
            BaselineHook(settings.baseline_n),
            LogHook(),
        ]
        if settings.cache_affinity:
            hooks.append(AffinityHook())
        values = granted_values(env, settings.secret_env)
        values += [env[name] for name in settings.redact_env if name in env]
        stoppers: dict[str, Stopper] = {}
        runs = run_registry(self.launcher)
        self.lifecycle = Lifecycle(
            settings, store=self.store, quick=self.quick, launcher=self.launcher, scheduler=self.scheduler,
            hooks=Hooks(hooks), worker_id=worker_id(), domain=launcher_domain(self.launcher), environ=env,
            logs=LogStore(client, maxlen=settings.log_stream_maxlen, ttl_s=settings.log_stream_ttl_s),
            daemons=DaemonHealth(client), redact_values=values, stoppers=stoppers, runs=runs,
            archive=Archive(settings.archive_dir) if settings.archive_dir else None,
        )  # fmt: skip
        self.cancels = CancelListener(client, stoppers)
        self.scheduler.listen(self.cancels)
        self.quick.scripts.preload()  # no build of this process waits for a SCRIPT LOAD

    def close(self) -> None:
        """The process is ending: the scheduler stops, the launcher gives back what it holds."""
        self.scheduler.drain(5.0)
        self.scheduler.stop()
        self.cancels.close()
        try:
            self.launcher.close()
        finally:
            self.store.redis.close()
            self.quick.redis.close()


class MainRuntime:
    """The worker main process's periodic work: the janitor, the daemon watch, leftovers, the
    heartbeat and (serving metrics) the deployment's queue gauges."""

    def __init__(
        self,
        settings: Settings,
        *,
        announce: Announce | None = None,
        node: str | None = None,
        queues: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        #: the queues this worker consumes (its heartbeat names them: the janitor reads their heads)
        self.queues = list(queues) or [settings.high_priority_queue, settings.queue]
        self.store = make_store(settings, quick=True)  # all of it runs on the scheduler's thread
        self.scheduler = Scheduler(name="buildq-main")
        self.launcher = make_launcher(settings)
        self.health = DaemonHealth(self.store.redis)
        self.watch = DaemonWatch(self.health, self.launcher, settings.daemons, announce=announce)
        self.runs = RunRegistry(
            Path(str(getattr(self.launcher, "state_dir", tempfile.gettempdir()))) / "runs"
        )
        #: this worker (its Celery node name when given) and where its runs can be killed from
        self.worker = node or worker_id()
        self.janitor = Janitor(
            self.store, after_s=settings.requeue_lost_after_s, owner=self.worker, daemons=settings.daemons,
            slot_grace_s=settings.lease_ttl_s,
        )  # fmt: skip
        self.domain = launcher_domain(self.launcher)
        #: the queue gauges this worker serves, and its own counters (None: no metrics port)
        self.gauges = DeploymentGauges()
        self.metrics = MainMetrics() if settings.metrics_port is not None else None

    def start(self) -> None:
        """Reap what dead workers left, then run the janitor, the daemon watch and the reaping of
        what replaced pool processes leave (their warm container, their live gauges) periodically."""
        self.reap_orphans()
        every = max(0.5, self.settings.requeue_lost_after_s / 2)
        self.scheduler.every(every, self._janitor)
        self.scheduler.every(self.watch.interval_s, self._watch)
        self.scheduler.every(REAP_EVERY_S, self._reap)
        self.scheduler.every(HEARTBEAT_EVERY_S, self._heartbeat, first_in=0.0)
        self.scheduler.every(1.0, self.reap_runs)
        if os.environ.get(MULTIPROC_ENV):
            self.scheduler.every(REAP_EVERY_S / 3, reap_dead_gauges)
        if self.settings.metrics_port is not None:
            self.scheduler.every(GAUGES_EVERY_S, self.refresh_gauges, first_in=0.0)

    def refresh_gauges(self) -> None:
        """Read the deployment's queue gauges (computing them when this worker holds their lease)."""
        s = self.settings
        try:
            read = read_gauges(
                self.store, worker=self.worker, queue=s.queue, high_queue=s.high_priority_queue,
                daemons=s.daemons, limit=s.buildkit_max_builds, lease_s=3 * GAUGES_EVERY_S,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - Redis away: the gauges age until it is back
            log.info("queue gauges not read: %s", exc)
            return
        self.gauges.update(read)

    def reap_orphans(self) -> list[str]:
        """Kill leftover buildctl runs whose job lease has expired; their job ids."""
        reaped = []
        try:
            job_ids = self.launcher.find_orphans()
        except Exception as exc:  # noqa: BLE001 - the engine may be down; the worker still starts
            log.warning("could not list leftover buildctl runs: %s", exc)
            return []
        for job_id in job_ids:
            if self.store.lease_holder(job_id) is None:
                self.launcher.kill_orphan(job_id)
                reaped.append(job_id)
        if reaped:
            log.warning("removed %d leftover buildctl run(s): %s", len(reaped), ", ".join(reaped))
        try:
            self.launcher.reap_scratch()
        except OSError as exc:
            log.warning("could not remove leftover scratch directories: %s", exc)
        return reaped

    def close(self) -> None:
        self.scheduler.stop()
        try:
            self.launcher.close()
        finally:
            self.store.redis.close()

    def reap_runs(self) -> list[str]:
        """Kill this host's runs whose supervisor stopped renewing their claim (stalled past a lease,
        or gone) and say in Redis that they are over; their job ids."""
        killed = []
        for run in self.runs.runs():
            if not stale(run, lease_ttl_s=self.settings.lease_ttl_s + 1.0):
                continue
            try:
                self.launcher.kill_orphan(run.job_id, run.gen)
                RunRegistry.close(run.path)
                self.store.mark_dead(run.job_id, run.gen)
            except Exception as exc:  # noqa: BLE001 - try again at the next pass
                log.info("job %s: stalled run not reaped yet: %s", run.job_id, exc)
                continue
            killed.append(run.job_id)
            log.warning("job %s: its run (claim %d) lost its supervisor; killed", run.job_id, run.gen)
        return killed

    def _heartbeat(self) -> None:
        try:
            self.store.heartbeat(
                worker=self.worker, domain=self.domain, ttl_s=3 * HEARTBEAT_EVERY_S, queues=self.queues
            )
        except Exception as exc:  # noqa: BLE001 - Redis away: the next beat says it again
            log.info("heartbeat not written: %s", exc)

    def _reap(self) -> None:
        try:
            self.reap_orphans()
        except Exception as exc:  # noqa: BLE001 - the engine may be away; try again next round
            log.info("leftover check skipped: %s", exc)

    def _janitor(self) -> None:
        try:
            requeued = self.janitor.run_once()
            if self.metrics is not None:
                self.metrics.janitor_requeued(len(requeued))
        except Exception as exc:  # noqa: BLE001 - Redis may be down; try again next round
            log.info("lost-message check skipped: %s", exc)

    def _watch(self) -> None:
        try:
            self.watch.tick()
        except Exception as exc:  # noqa: BLE001 - Redis may be away; try again next tick
            log.info("daemon probe skipped: %s", exc)
