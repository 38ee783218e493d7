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

from ..config import Settings
from ..errors import InvalidJobError
from ..jobs import BuildJob, parse_job
from ..launchers.base import Launcher
from ..records import redact_strings, rejected_record, window_start_of
from ..store.claim import claim, release
from ..store.jobs import JobStore
from ..store.logs import LogStore
from ..store.slots import DaemonSlots, wait_for_slot
from .attempt import Attempt, AttemptRun
from .checks import check_job_on_worker
from .interface import Delivery, LeaseLost, Reporter, WaitForDaemon
from .metrics import BuildMetrics, NoMetrics
from .redact import redactor_for
from .runner import WATCH_INTERVAL_S
from .sidechannel import SideChannel
from .ticker import Ticker

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
    side: SideChannel = field(default_factory=SideChannel)
    ticker: Ticker = field(default_factory=lambda: Ticker(WATCH_INTERVAL_S))
    #: how long a delivery polls for a daemon slot before it re-queues itself
    slot_wait_s: float = 5.0
    #: seconds between polls while waiting for another worker's lease on the same job
    duplicate_poll_s: float = 0.5

    def __post_init__(self) -> None:
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

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
            check_job_on_worker(job, environ=self.environ, max_timeout_s=self.settings.max_timeout_s)
        except InvalidJobError as exc:
            return self._reject(delivery, exc, enqueued, earlier)

        number = len(earlier) + 1
        token = self.store.new_token()
        prefer = zlib.crc32(job.job_id.encode()) + number - 1  # spread jobs; move on at a retry
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
                self._kill_orphan(job.job_id)
            if got.cancelled:
                return run.cancelled_before_start()
            if attempt.daemon is None:
                attempt.daemon = self._wait_for_daemon(job, token, prefer)
            return run.run()
        finally:
            if not attempt.released:  # a retry or an error: the result transaction did not release it
                release(self.store, self.slots, job.job_id, token, attempt.daemon)

    def _wait_for_daemon(self, job: BuildJob, token: str, prefer: int) -> str:
        assert self.slots is not None
        daemon = wait_for_slot(
            self.slots,
            self.settings.daemons,
            token,
            self.settings.lease_ttl_s,
            self.settings.buildkit_max_builds,
            prefer=prefer,
            max_wait_s=self.slot_wait_s,
        )
        if daemon is None:
            self.store.update(job.job_id, state="queued", phase="waiting_for_daemon")
            raise WaitForDaemon(countdown=1.0 + (self.rand or random.random)() * 2.0)
        return daemon

    def _kill_orphan(self, job_id: str) -> None:
        try:
            self.launcher.kill_orphan(job_id)
        except Exception:  # noqa: BLE001 - best effort, the build goes on
            pass

    def _reject(
        self, delivery: Delivery, exc: InvalidJobError, enqueued: float, earlier: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """An invalid job: a failed record naming the field; buildctl is never launched."""
        message = delivery.message
        job_id = message.get("job_id") if isinstance(message, dict) else None
        if not isinstance(job_id, str) or not job_id:
            job_id = delivery.task_id or "unknown"
        record = rejected_record(
            job_id, message=exc.message, field=exc.field, attempts=earlier, enqueued_at=enqueued,
            finished_at=self.clock(), worker=self.worker_id,
        )  # fmt: skip
        redactor = redactor_for(self.settings.redact_env, self.environ)  # the job's own are unknown
        record = redact_strings(record, redactor.redact if redactor is not None else None)
        if job_id != "unknown":
            self.store.store_result(job_id, record)
        self.metrics.build_finished(record)
        return record
