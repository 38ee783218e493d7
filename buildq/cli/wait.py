"""``buildq submit --wait``: wait for the record, showing the build's progress meanwhile."""

from __future__ import annotations

import sys
import time
from typing import Any


def wait_for(client: Any, job_id: str, timeout: float | None, progress: str) -> dict[str, Any]:
    """Wait for the record; meanwhile ``plain`` prints the build log to stderr (as buildctl does)
    and ``auto`` on a terminal shows live progress on stderr."""
    if progress == "plain":
        return _wait_plain(client, job_id, timeout)
    if progress == "auto" and sys.stderr.isatty():
        return _wait_live(client, job_id, timeout)
    return client.wait(job_id, timeout)


def _wait_plain(client: Any, job_id: str, timeout: float | None) -> dict[str, Any]:
    from ..store.logs import format_entry

    deadline = None if timeout is None else time.monotonic() + timeout

    def over() -> bool:
        return client.store.result(job_id) is not None or (
            deadline is not None and time.monotonic() > deadline
        )

    for entry in client.follow_logs(job_id, is_finished=over):
        print(format_entry(entry, show_attempt=entry.kind == "mark"), file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            break
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    return client.wait(job_id, left)


def _wait_live(client: Any, job_id: str, timeout: float | None) -> dict[str, Any]:
    from rich.console import Console

    from ..client.logview import PlainView
    from .views import StepCounter, live_wait

    counter, last, view = StepCounter(), ["0-0"], PlainView()

    def steps() -> tuple[int, int, int] | None:
        for entry in view.feed(client.log_store.read(job_id, after=last[0])):
            last[0] = entry.id
            if entry.kind == "mark" and " started on " in entry.line:  # a new attempt
                counter.reset()
            elif entry.kind == "plain":
                counter.feed(entry.line)
        return counter.counts()

    def finished(wait_s: float) -> dict[str, Any] | None:
        try:
            return client.wait(job_id, wait_s)
        except TimeoutError:
            return None

    try:
        return live_wait(lambda: client.status(job_id), steps, finished, Console(stderr=True), timeout)
    except TimeoutError:
        raise TimeoutError(f"job {job_id} has no result after {timeout}s") from None
