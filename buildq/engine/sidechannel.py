"""Off-the-critical-path writes of a worker process (progress events, task state, job hash).

A build's latency is what happens between the message arriving and buildctl starting, and
between buildctl exiting and the result being readable. Live progress (Celery events, the
``BUILDING`` task state, the job hash's ``phase``) is worth having but must not sit on those paths,
so it goes to one background thread per process (a one-thread executor: in submission order).
:meth:`SideChannel.drain` waits until everything submitted so far is written: the task drains
before it returns, so a late ``BUILDING`` can never overwrite the final state. A short build
submits nothing; its drain then returns at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("buildq.sidechannel")


class SideChannel:
    """An ordered, best-effort background executor (its thread starts on first use)."""

    def __init__(self, name: str = "buildq-side") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._last: concurrent.futures.Future[None] | None = None
        self.failures = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` soon, after everything submitted before it; errors are logged, not raised."""
        with self._lock:
            self._last = self._executor.submit(self._call, fn, args)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far has run; False if ``timeout`` passed first."""
        with self._lock:
            last = self._last
        if last is None or last.done():  # nothing in flight: no hand-off to the side thread
            return True
        try:
            last.result(timeout)  # one thread, in order: the last one done means all are
        except concurrent.futures.TimeoutError:
            return False
        return True

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the build goes on
            self.failures += 1
            log.warning("progress update failed: %s", exc)
