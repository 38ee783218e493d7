"""The worker process's warm runner container, and who owns a warm container.

:class:`WarmSlot` makes the container on first use, shares it between the process's builds and
replaces it when it has ended, when ``BUILDQ_BUILDCTL_IMAGE`` now names another image (checked
at most every ``IMAGE_RECHECK_S``, on an injected clock), or in a forked child (which never
touches its parent's container). A replaced container is removed once its last build closes.
Settings cannot change under a container: each worker process makes its own from its settings.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from .docker_box import RunnerContainer
from .docker_plan import WORKER_LABEL, WORKER_STARTED_LABEL

IMAGE_RECHECK_S = 30.0


class WarmSlot:
    """Holds the current warm container; ``acquire``/``release`` bracket each build."""

    def __init__(
        self,
        make: Callable[[], RunnerContainer],
        image_id: Callable[[], str | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = IMAGE_RECHECK_S,
    ) -> None:
        self._make, self._image_id, self._clock, self._recheck_s = make, image_id, clock, recheck_s
        self._lock = threading.Lock()
        self.box: RunnerContainer | None = None
        self._checked = 0.0
        self._atexit = False

    def acquire(self) -> RunnerContainer:
        with self._lock:
            box = self.box
            if box is not None and (box.dead or box.pid != os.getpid() or self._image_changed(box)):
                self._retire(box)
                box = None
            if box is None:
                box = self.box = self._make()
                self._checked = self._clock()
                if not self._atexit:
                    atexit.register(self.close)
                    self._atexit = True
            box.refs += 1
            return box

    def release(self, box: RunnerContainer) -> None:
        with self._lock:
            box.refs -= 1
            if box is not self.box and box.refs <= 0 and box.pid == os.getpid():
                box.close()

    def close(self) -> None:
        """Remove this process's warm container (with any build still in it)."""
        with self._lock:
            box, self.box = self.box, None
            if box is not None and box.pid == os.getpid():
                box.close()

    def _image_changed(self, box: RunnerContainer) -> bool:
        now = self._clock()
        if now - self._checked < self._recheck_s:
            return False
        self._checked = now
        try:
            current = self._image_id()
        except Exception:  # noqa: BLE001 - the engine is down: the build will say so itself
            return False
        return current is not None and current != box.image_id

    def _retire(self, box: RunnerContainer) -> None:
        self.box = None
        if box.pid != os.getpid():
            return  # the parent's container (we are a forked child): not ours to close
        if box.refs <= 0:
            box.close()


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def worker_labels() -> dict[str, str]:
    """``buildq.worker=<hostname>:<pid>`` and the process's start time (pid reuse is told apart)."""
    pid = os.getpid()
    return {WORKER_LABEL: f"{socket.gethostname()}:{pid}", WORKER_STARTED_LABEL: process_started(pid) or ""}


def worker_gone(labels: Mapping[str, str], hostname: str | None = None) -> bool:
    """True when a warm container's worker process ran on this host and is no longer there."""
    host, _, pid = labels.get(WORKER_LABEL, "").rpartition(":")
    if host != (hostname or socket.gethostname()) or not pid.isdigit():
        return False  # another host's (or unlabelled): its own reaper decides
    started = process_started(int(pid))
    return started is None or started != labels.get(WORKER_STARTED_LABEL)
