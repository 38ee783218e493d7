"""Off-the-critical-path writes of a worker process (progress events, task state, job hash).

A build's latency is what happens between the message arriving and buildctl starting, and
between buildctl exiting and the result being readable. Live progress (Celery events, the
``BUILDING`` task state, the job hash's ``phase``) is worth having but must not sit on those paths,
so it goes through one daemon thread per process, in submission order. :meth:`SideChannel.drain`
waits until everything submitted so far is written: the task drains before it returns, so a late
``BUILDING`` can never overwrite the final state. A short build submits nothing; its drain then
returns at once, with no hand-off to the side thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("buildq.sidechannel")


class SideChannel:
    """An ordered, best-effort background executor (one thread, started on first use)."""

    def __init__(self, name: str = "buildq-side") -> None:
        self._name = name
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet run
        self.failures = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` soon, after everything submitted before it; errors are logged, not raised."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        with self._lock:
            self._pending += 1
        self._queue.put((fn, args))

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far has run; False if ``timeout`` passed first."""
        with self._lock:
            if self._pending == 0:  # nothing in flight: no hand-off to the side thread
                return True
        done = threading.Event()
        self.submit(done.set)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            self._call(fn, args)
            with self._lock:
                self._pending -= 1

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the build goes on
            self.failures += 1
            log.warning("progress update failed: %s", exc)
