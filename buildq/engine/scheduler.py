"""The one thread of a worker process that does its periodic and background work.

A pool process uses it for each running build's watch (lease renewal, deadline), its log flushes,
the batched Celery events and the progress writes that must not delay buildctl's start or the
stored result; the main process for the janitor, the daemon watch, the host's reaper and the
gauges. Instead of a thread per concern (or per build), one :class:`Scheduler` keeps a queue of
timed calls and runs them in turn, and while it has nothing to do it waits on the process's
cancel subscription (:meth:`Scheduler.listen`), so a cancel is acted on the moment it is published.

Calls run one after another on that thread, so they must be quick (a Redis round trip, a kill).
A failing call is logged and never stops the thread. A scheduler belongs to the process that made
it (its thread does not survive a fork): each pool process makes its own after the fork.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("buildq.scheduler")

#: ``listener(timeout)``: wait at most ``timeout`` s for outside events and handle them; it returns
#: a readable file descriptor to wait on next time, or None to be called with a plain timeout
Listener = Callable[[float], Any]


def _nothing() -> None:
    return None


class Handle:
    """One scheduled call; :meth:`cancel` stops it."""

    def __init__(self, scheduler: Scheduler, fn: Callable[[], Any], interval_s: float | None) -> None:
        self._scheduler, self._fn, self.interval_s = scheduler, fn, interval_s
        self._lock = threading.RLock()
        self.cancelled = False

    def cancel(self) -> None:
        """When this returns the call is not running and will not run again (unless it is the
        scheduler's own thread that cancels: then after the current call), and the handle keeps
        nothing of the call alive (a build's deadline waits in the queue long after the build)."""
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            self._fn = _nothing
        self._scheduler._forget_one()

    def _run(self) -> bool:
        """Run once; True when it should run again (periodic, not cancelled, not done)."""
        with self._lock:
            if self.cancelled:
                return False
            try:
                done = self._fn()
            except Exception:  # noqa: BLE001 - one failing call must not stop the others
                log.exception("scheduled call failed")
                done = False
            if self.interval_s is None or done is True:
                self.cancelled = True
            return not self.cancelled


class Scheduler:
    """Timed calls on one daemon thread (started on first use)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, name: str = "buildq-scheduler"
    ) -> None:
        self._clock, self._name = clock, name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = False
        self._listener: Listener | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._soon_done = 0
        self._soon_sent = 0
        #: cancelled calls still in the queue (about: a cancel of a call being run counts too)
        self._dead = 0

    # -- scheduling ------------------------------------------------------------------------------
    def every(self, interval_s: float, fn: Callable[[], Any], *, first_in: float | None = None) -> Handle:
        """Call ``fn()`` every ``interval_s`` (first after ``first_in``, default one interval) until
        it returns True or the handle is cancelled."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        return self._add(Handle(self, fn, interval_s), interval_s if first_in is None else first_in)

    def later(self, delay_s: float, fn: Callable[[], Any]) -> Handle:
        """Call ``fn()`` once, ``delay_s`` from now."""
        return self._add(Handle(self, fn, None), delay_s)

    def cancel(self, handles: list[Handle]) -> None:
        """Cancel every one of ``handles`` (see :meth:`Handle.cancel`)."""
        for handle in handles:
            handle.cancel()

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` as soon as the thread is free, after every ``soon`` before it."""

        def call() -> None:
            try:
                fn(*args)
            finally:
                with self._cond:
                    self._soon_done += 1
                    self._cond.notify_all()

        with self._cond:
            self._soon_sent += 1
        self._add(Handle(self, call, None), 0.0)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every ``soon`` call made so far has run; False if ``timeout`` passed first."""
        with self._cond:
            target = self._soon_sent
            if self._soon_done >= target or threading.current_thread() is self._thread:
                return True
            return self._cond.wait_for(lambda: self._soon_done >= target, timeout)

    def listen(self, listener: Listener | None) -> None:
        """While idle, wait in ``listener(timeout)`` instead of sleeping (the cancel subscription)."""
        self._listener = listener
        self._wake()

    def pending(self) -> int:
        """Calls scheduled and not cancelled."""
        with self._cond:
            return sum(1 for _, _, h in self._heap if not h.cancelled)

    def stop(self) -> None:
        """Stop the thread after its current call (the process ends)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._wake()

    def _forget_one(self) -> None:
        """A call was cancelled: once cancelled calls are most of the queue, drop them all (a
        pool process cancels every build's deadline; the queue stays as long as what is live)."""
        with self._cond:
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._dead = 0

    # -- the thread ----------------------------------------------------------------------------
    def _add(self, handle: Handle, delay_s: float) -> Handle:
        if os.getpid() != self._pid:
            raise RuntimeError("a scheduler serves the process that made it (make one after a fork)")
        with self._cond:
            due = self._clock() + max(0.0, delay_s)
            first = not self._heap or due <= self._heap[0][0]
            heapq.heappush(self._heap, (due, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        if first:
            self._wake()
        return handle

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:  # noqa: BLE001 - builds rely on this thread: never let it die
                log.exception("scheduler failed; going on")
                time.sleep(0.1)

    def _step(self) -> bool:
        """Run what is due, else wait until the next call is due; True once stopped."""
        with self._cond:
            if self._stopped:
                return True
            now = self._clock()
            due = []
            while self._heap and self._heap[0][0] <= now:
                handle = heapq.heappop(self._heap)[2]
                if handle.cancelled:
                    self._dead = max(0, self._dead - 1)
                else:
                    due.append(handle)
            wait = self._heap[0][0] - now if self._heap else 60.0
        for handle in due:
            if handle._run():
                with self._cond:
                    heapq.heappush(
                        self._heap, (self._clock() + (handle.interval_s or 0.0), next(self._seq), handle)
                    )
        if not due:
            self._idle(wait)
        return False

    def _idle(self, wait: float) -> None:
        """Wait for the next call, a wake-up, or the listener's events."""
        listener = self._listener
        fds: list[Any] = [self._wake_r]
        if listener is not None:
            try:
                fd = listener(0.0)  # handle what already arrived; where to wait for more
            except Exception as exc:  # noqa: BLE001 - Redis away: plain waiting until it is back
                log.debug("listener failed: %s", exc)
                fd, wait = None, min(wait, 1.0)
            if fd is not None:
                fds.append(fd)
            else:
                wait = min(wait, 1.0)
        try:
            readable, _, _ = select.select(fds, [], [], max(0.0, wait))
        except (OSError, ValueError):
            readable = []
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
