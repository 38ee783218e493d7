"""One timer thread per worker process that runs every running build's watcher on its own schedule.

A build's watcher (cancel flag, lease renewal, deadline) runs every ``interval_s`` from the build's
start. Starting a thread per build costs more than a short build's whole bookkeeping, so one daemon
thread (started on first use) serves all builds of the process. Each build's ticks come
``interval_s`` apart counted from its own start, so a build that ends sooner is never ticked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("buildq.ticker")


class Ticket:
    """One registered callback; :meth:`cancel` stops it."""

    def __init__(self, ticker: Ticker, fn: Callable[[], bool], due: float) -> None:
        self._ticker, self._fn, self.due = ticker, fn, due
        self._lock = threading.Lock()
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the callback. When this returns it is not running and will not run again."""
        with self._lock:
            self.cancelled = True
        self._ticker._forget(self)

    def _fire(self, clock: Callable[[], float], interval_s: float) -> None:
        with self._lock:
            if self.cancelled:
                return
            try:
                done = self._fn()
            except Exception:  # noqa: BLE001 - a failing watcher must not stop the others
                log.exception("build watcher failed")
                done = False
            self.due = clock() + interval_s
            self.cancelled = bool(done)
        if done:
            self._ticker._forget(self)


class Ticker:
    """Calls each registered callback every ``interval_s`` until it returns True or is cancelled.

    Callbacks run one after another on the ticker's thread, so they must be quick (a Redis round
    trip, a kill). The thread is a daemon, started on the first :meth:`every`; make one ticker per
    process (after a fork, the child needs its own).
    """

    def __init__(
        self, interval_s: float, *, clock: Callable[[], float] = time.monotonic, name: str = "buildq-ticker"
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.interval_s = interval_s
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._tickets: list[Ticket] = []
        self._thread: threading.Thread | None = None

    def every(self, fn: Callable[[], bool]) -> Ticket:
        """Call ``fn()`` every ``interval_s`` from now (first call one interval from now)."""
        ticket = Ticket(self, fn, self._clock() + self.interval_s)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            # no wake-up needed (waking the thread costs the build more than the tick): every
            # other ticket is due sooner than this one, and an idle ticker looks every interval
            self._tickets.append(ticket)
        return ticket

    def __len__(self) -> int:
        with self._cond:
            return len(self._tickets)

    def _forget(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._tickets:
                self._tickets.remove(ticket)

    def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - builds rely on this thread: never let it die
                log.exception("ticker failed; going on")
                time.sleep(self.interval_s)

    def _tick(self) -> None:
        with self._cond:
            now = self._clock()
            due = [t for t in self._tickets if t.due <= now]
            if not due:
                nearest = min((t.due for t in self._tickets), default=now + self.interval_s)
                self._cond.wait(nearest - now)
                return
        for ticket in due:
            ticket._fire(self._clock, self.interval_s)
