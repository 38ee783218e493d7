"""What a worker does with one delivered build message, apart from Celery.

:meth:`BuildService.handle` validates the job (an invalid one gets a rejected record and never
launches buildctl), claims it (lease, cancel flag, daemon slot: one round trip,
:mod:`buildq.store.claim`) and hands the claimed attempt to :class:`~buildq.engine.attempt.AttemptRun`.
Only what must precede buildctl's start or the stored result sits on those paths; live progress
goes through the process's :class:`~buildq.engine.sidechannel.SideChannel`, and the build's watcher
runs on its :class:`~buildq.engine.ticker.Ticker`.
"""

from __future__ import annotations

import os
import random
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..buildkit.classify import DAEMON_LOST_REASONS
from ..config import Settings
from ..contract.grants import granted_values
from ..contract.job import BuildJob, cache_key, parse_job
from ..errors import InvalidJobError
from ..launchers.base import Launcher
from ..records import routing_reason, window_start_of
from ..store.claim import Claim, claim, release
from ..store.daemons import DaemonHealth
from ..store.jobs import JobStore
from ..store.logs import LogStore
from ..store.slots import DaemonSlots, wait_for_slot_preferring
from .attempt import Attempt, AttemptRun
from .checks import WorkerChecks
from .interface import Delivery, Hold, LeaseLost, Reporter, RetryLater, WaitForDaemon
from .metrics import BuildMetrics, NoMetrics
from .redact import Redactor
from .rejection import kill_orphan, reject
from .runner import WATCH_INTERVAL_S
from .sidechannel import SideChannel
from .ticker import Ticker
from .unavailable import unavailable_message

Clock = Callable[[], float]


@dataclass
class BuildService:
    """Per-process build runtime: settings, launcher, stores, clock and metrics, built once."""

    settings: Settings
    launcher: Launcher
    store: JobStore
    clock: Clock = time.time
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    rand: Callable[[], float] | None = None
    metrics: BuildMetrics | NoMetrics = field(default_factory=NoMetrics)
    logs: LogStore | None = None
    slots: DaemonSlots | None = None
    daemons: DaemonHealth | None = None
    side: SideChannel = field(default_factory=SideChannel)
    ticker: Ticker = field(default_factory=lambda: Ticker(WATCH_INTERVAL_S))
    #: how long a delivery polls for a daemon slot before it re-queues itself
    slot_wait_s: float = 5.0
    #: seconds between polls while waiting for another worker's lease on the same job
    duplicate_poll_s: float = 0.5

    def __post_init__(self) -> None:
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # every variable a job may name as a secret, and BUILDQ_REDACT_ENV's: masked in logs and records
        values = granted_values(self.environ, self.settings.secret_env)
        values += [self.environ[name] for name in self.settings.redact_env if name in self.environ]
        self.redact_values = values
        self.redactor: Redactor | None = Redactor(values) if values else None
        self.checks = WorkerChecks(self.settings, self.environ)

    def handle(self, delivery: Delivery, reporter: Reporter | None = None) -> dict[str, Any]:
        """Process one delivery; return the final record or raise RetryLater / WaitForDaemon / LeaseLost."""
        try:
            return self._handle(delivery, reporter or Reporter())
        finally:
            # progress written after the final state would make it look like the build still runs
            self.side.drain()

    def _handle(self, delivery: Delivery, reporter: Reporter) -> dict[str, Any]:
        enqueued = delivery.enqueued_at if delivery.enqueued_at is not None else self.clock()
        earlier = list(delivery.attempts)
        try:
            job = parse_job(delivery.message)
            self.checks(job)
        except InvalidJobError as exc:
            return reject(self, delivery, exc, enqueued, earlier)

        number = len(earlier) + 1
        token = self.store.new_token()
        prefer = zlib.crc32(job.job_id.encode()) + number - 1  # spread jobs; move on at a retry
        avoid = _lost_daemon(earlier)  # a retry after a GOAWAY prefers another daemon
        try:
            got = claim(
                self.store,
                self.slots,
                job.job_id,
                token,
                daemons=self.settings.daemons,
                limit=self.settings.buildkit_max_builds,
                ttl_s=self.settings.lease_ttl_s,
                prefer=prefer,
                give_up_after_s=self.settings.max_timeout_s + self.settings.lease_ttl_s,
                poll_s=self.duplicate_poll_s,
                avoid=avoid,
                cache_key=cache_key(job) if self.settings.cache_affinity else None,
                affinity_wait=self.settings.affinity_wait_s > 0,
                clock=self.clock,
            )
        except TimeoutError as exc:
            raise LeaseLost(str(exc)) from None
        if got.record is not None:
            return got.record
        window_start = window_start_of(earlier, delivery.window_start, enqueued)
        attempt = Attempt(job, number, token, got.daemon, enqueued, window_start, earlier, reporter)
        run = AttemptRun(self, attempt)
        try:
            if got.claimed_before:
                # a retry, or an earlier delivery that died mid-build: its buildctl may still run
                kill_orphan(self.launcher, job.job_id)
            if got.cancelled:
                return run.end.cancelled_before_start()
            if attempt.daemon is None:
                waited = all_down_since(self.daemons, self.settings.daemons, delivery, self.clock)
                if waited is not None and self.clock() - waited >= self.settings.daemon_wait_s:
                    message = unavailable_message(self.daemons, self.settings, self.clock())
                    return run.end.give_up("daemon_unavailable", message)
                attempt.daemon = self._wait_for_daemon(job, token, prefer, avoid, waited, got)
            attempt.routing = routing_reason(got.preferred, attempt.daemon)
            return run.run()
        except (RetryLater, WaitForDaemon) as back:
            # the caller publishes the next message, then gives the claim back (never the reverse)
            back.hold = Hold(job.job_id, token, attempt.daemon)
            attempt.released = True
            raise
        finally:
            if not attempt.released:  # an error: the result transaction did not release it
                release(self.store, self.slots, job.job_id, token, attempt.daemon)

    def release(self, hold: Hold) -> None:
        """Give back a claim handed over with RetryLater / WaitForDaemon."""
        release(self.store, self.slots, hold.job_id, hold.token, hold.daemon)

    def requeue(self, hold: Hold, *, queue: str, message: bytes, tag: str, due: float, phase: str) -> bool:
        """Publish the job's next message and give the claim back, atomically (same Redis as the
        broker); False when another delivery owns the job now (nothing published)."""
        slot = self.slots.key(hold.daemon) if self.slots is not None and hold.daemon is not None else None
        return self.store.requeue(
            hold.job_id,
            hold.token,
            queue=queue,
            message=message,
            tag=tag,
            due=due,
            phase=phase,
            slot_key=slot,
        )

    def _wait_for_daemon(
        self,
        job: BuildJob,
        token: str,
        prefer: int,
        avoid: str | None,
        waiting_since: float | None,
        got: Claim,
    ) -> str:
        """A daemon slot; WaitForDaemon when all daemons stay full, or at once when all are down.
        When the daemon with the job's cache is full, it is waited for alone first (for at most
        ``BUILDQ_AFFINITY_WAIT_S``), then any daemon for the rest of ``slot_wait_s``."""
        assert self.slots is not None
        jitter = (self.rand or random.random)()
        if waiting_since is not None:  # every daemon is down: wait off the pool, no attempt used
            self.store.update(job.job_id, state="queued", phase="waiting_for_daemon")
            left = self.settings.daemon_wait_s - (self.clock() - waiting_since)
            raise WaitForDaemon(countdown=max(0.1, min(1.0 + jitter, left)), waiting_since=waiting_since)
        s = self.settings
        daemon = wait_for_slot_preferring(
            self.slots, s.daemons, token, s.lease_ttl_s, s.buildkit_max_builds,
            preferred=got.preferred if got.preferred_full else None, affinity_wait_s=s.affinity_wait_s,
            slot_wait_s=self.slot_wait_s, prefer=prefer, avoid=avoid,
        )  # fmt: skip
        if daemon is None:
            self.store.update(job.job_id, state="queued", phase="waiting_for_daemon")
            raise WaitForDaemon(countdown=1.0 + jitter * 2.0)
        return daemon


def _lost_daemon(earlier: list[dict[str, Any]]) -> str | None:
    """The daemon the previous attempt lost (GOAWAY, connection gone), to be avoided now."""
    if earlier and earlier[-1].get("reason") in DAEMON_LOST_REASONS:
        daemon = earlier[-1].get("daemon")
        return str(daemon) if daemon else None
    return None


def all_down_since(
    health: DaemonHealth | None, daemons: list[str], delivery: Delivery, clock: Clock
) -> float | None:
    """When every daemon is down: since when this job has waited for one (else None)."""
    if health is None:
        return None
    down = health.down()
    if not all(d in down for d in daemons):
        return None
    return delivery.waiting_since if delivery.waiting_since is not None else clock()
