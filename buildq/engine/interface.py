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
    window_start: float | None = None


@dataclass
class RetryLater(Exception):
    """Run the job again in ``countdown`` seconds, carrying the attempts so far (redacted) and the end
    of this attempt's time window (where the next one's starts)."""

    countdown: float
    attempts: list[dict[str, Any]]
    reason: str
    window_end: float | None = None


class WaitForDaemon(Exception):
    """Every daemon is at its cap: re-queue this delivery (no attempt used) in ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"all BuildKit daemons are busy; re-queued for {countdown:.1f}s")
        self.countdown = countdown


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
