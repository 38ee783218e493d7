"""Closing the circuit breakers: probe each down daemon until it answers again.

Every worker's main process ticks one :class:`DaemonWatch` on its scheduler. Each second it reads which
daemons are down (:class:`~buildq.store.daemons.DaemonHealth`); for each, the worker that takes the
probe lock runs ``buildctl debug workers`` through its launcher (a probe, not a build). When the
daemon answers, its breaker closes and builds go to it again; only the worker that closed it
announces it. So a deployment probes a down daemon about once a second, whatever its size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from ..launchers.base import Launcher
from ..store.daemons import DaemonHealth
from .probe import probe_daemon

log = logging.getLogger("buildq.daemons")

#: called as ``announce(daemon, seconds_down)`` when this worker closed a daemon's breaker
Announce = Callable[[str, float], None]


class DaemonWatch:
    """Probes the down daemons among ``daemons``; :meth:`tick` once, :meth:`start` a thread."""

    def __init__(
        self,
        health: DaemonHealth,
        launcher: Launcher,
        daemons: Sequence[str],
        *,
        announce: Announce | None = None,
        interval_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.health, self.launcher, self.daemons = health, launcher, list(daemons)
        self.announce = announce
        self.interval_s, self.timeout_s, self.clock = interval_s, timeout_s, clock
        self.probes = 0

    def tick(self) -> list[str]:
        """Probe each down daemon whose probe lock this worker gets; return those that came back."""
        down = self.health.down()
        back = []
        for daemon in self.daemons:
            # the lock outlives the probe; one probe per interval across the deployment
            if daemon not in down or self.health.held(daemon):
                continue
            if not self.health.try_probe(daemon, self.timeout_s + self.interval_s):
                continue
            self.probes += 1
            result = probe_daemon(self.launcher, daemon, self.timeout_s, probe_id=f"probe-{self.probes}")
            self.health.probe_done(daemon, self.interval_s)
            if not result.ok:
                log.debug("BuildKit daemon %s still down: %s", daemon, result.detail)
                continue
            seconds = self.health.mark_up(daemon, self.clock())
            if seconds is not None:
                back.append(daemon)
                log.warning("BuildKit daemon %s is back after %.1fs down", daemon, seconds)
                if self.announce is not None:
                    self.announce(daemon, seconds)
        return back
