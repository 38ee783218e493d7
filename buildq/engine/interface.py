"""What the build engine and its caller (the Celery task) hand each other.

The caller gives a :class:`Delivery` (one message as it arrived) and a :class:`Reporter` (where
live progress goes); the engine returns the final record or raises one of the decisions below,
which the caller carries out: :class:`RetryLater` and :class:`WaitForDaemon` put the job back on
the queue, :class:`LeaseLost` drops this delivery because another one owns the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Delivery:
    """One delivered build message: the job as sent, when it was first enqueued, the attempts so far
    and, for a retry, where its time window starts (the end of the previous attempt's window)."""

    message: Any
    enqueued_at: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    task_id: str | None = None
    #: since when this job has been waiting for a BuildKit daemon to come back (all were down)
    waiting_since: float | None = None
    window_start: float | None = None


@dataclass(frozen=True)
class Hold:
    """A claim handed to the caller with RetryLater / WaitForDaemon: the caller publishes the job's
    next message first and gives the claim back after (``BuildService.requeue`` does both at once)."""

    job_id: str
    token: str
    daemon: str | None


@dataclass
class RetryLater(Exception):
    """Run the job again in ``countdown`` seconds, carrying the attempts so far (redacted) and the end
    of this attempt's time window (where the next one's starts)."""

    countdown: float
    attempts: list[dict[str, Any]]
    reason: str
    hold: Hold | None = None
    window_end: float | None = None


class WaitForDaemon(Exception):
    """No daemon can take the build: re-queue this delivery (no attempt used) in ``countdown`` seconds.

    ``waiting_since`` is set when every daemon is down (the wait that ``BUILDQ_DAEMON_WAIT_S``
    bounds); None when they are up but at their cap.
    """

    def __init__(self, countdown: float, waiting_since: float | None = None) -> None:
        why = "down" if waiting_since is not None else "busy"
        super().__init__(f"all BuildKit daemons are {why}; re-queued for {countdown:.1f}s")
        self.countdown = countdown
        self.waiting_since = waiting_since
        self.hold: Hold | None = None


class LeaseLost(Exception):
    """Another worker owns this job now; this delivery must not store anything."""


class Reporter:
    """Where live progress goes (the Celery task sends events and updates its state); no-op here.

    Called from the build's own thread; implementations hand the I/O to the side channel.
    ``done`` turns true once the result is stored: progress still queued then is stale.
    """

    def __init__(self) -> None:
        self.done = False

    def phase_started(self, job_id: str, attempt: int, phase: str) -> None:
        """The build entered ``phase`` (shown as the task's current state)."""

    def phase_ended(self, job_id: str, attempt: int, phase: str, seconds: float) -> None:
        """``phase`` ended after ``seconds`` (a ``task-phase`` event)."""

    def daemon_down(self, daemon: str, error: str) -> None:
        """This build found ``daemon`` gone and opened its circuit breaker (once per outage)."""
