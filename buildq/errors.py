"""The one exception hierarchy of buildq.

``BuildError`` is the root; ``TransientBuildError`` means "the same attempt may succeed if
retried" (daemon restarted, connection dropped), ``PermanentBuildError`` means "retrying the
same job cannot help" (bad Dockerfile, failing RUN step, auth refused).
"""

from __future__ import annotations


class BuildError(Exception):
    """A build could not produce its image. ``reason`` is a short machine label."""

    kind = "error"

    def __init__(self, message: str, *, reason: str = "unknown") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class TransientBuildError(BuildError):
    """A failure that another attempt of the same build may not hit (retry it)."""

    kind = "transient"


class PermanentBuildError(BuildError):
    """A failure that every attempt of the same build would hit (do not retry)."""

    kind = "permanent"


class InvalidJobError(PermanentBuildError):
    """The job itself is malformed; ``field`` names the offending field."""

    kind = "invalid"

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, reason="invalid_job")
        self.field = field


class NotReplicatedError(RuntimeError):
    """A submitted job was queued on the Redis master, but fewer replicas than wanted confirmed it
    within the timeout (a master crash now could lose it). Submitting it again with the same
    ``job_id`` is safe: the job id makes a second message return the first build's result."""

    def __init__(self, job_id: str, reached: int, wanted: int, timeout_s: float) -> None:
        super().__init__(
            f"job {job_id} is queued on the Redis master but {reached} of {wanted} replica(s) confirmed it "
            f"within {timeout_s:g}s (BUILDQ_SUBMIT_REPLICAS, BUILDQ_REPLICA_WAIT_TIMEOUT_S); "
            "submitting it again with the same job_id is safe"
        )
        self.job_id, self.reached, self.wanted = job_id, reached, wanted
