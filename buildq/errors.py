"""The one exception hierarchy of buildq: every error it raises on purpose is a :class:`BuildqError`.

- :class:`BuildError`: a build could not produce its image; :class:`TransientBuildError` means "the
  same attempt may succeed if retried" (daemon restarted, connection dropped),
  :class:`PermanentBuildError` "retrying the same job cannot help" (bad Dockerfile, failing RUN step,
  auth refused), and :class:`InvalidJobError` names the job's offending field.
- :class:`SettingsError`: the ``BUILDQ_*`` settings are invalid (each offending variable named).
- :class:`RedisUnavailable`: Redis did not answer within ``BUILDQ_REDIS_RETRY_S``.
- :class:`NotReplicatedError`: a submission reached the master but too few replicas.
- :class:`UploadError` (:mod:`buildq.client.upload`): a context could not be uploaded.

The command line turns each into one line on stderr and its exit code (:mod:`buildq.cli`).
"""

from __future__ import annotations


class BuildqError(Exception):
    """Something buildq could not do, said in one line (``str(error)``)."""


class BuildError(BuildqError):
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


class SettingsError(BuildqError, ValueError):
    """Settings are invalid; the message names each offending ``BUILDQ_*`` variable."""


class RedisUnavailable(BuildqError, ConnectionError):
    """Redis did not answer within the retry budget (``BUILDQ_REDIS_RETRY_S``), reconnecting (and,
    through Sentinel, asking for the master again) between tries. ``where`` names the Redis (no
    password), ``cause`` the last error."""

    def __init__(self, where: str, cause: str, seconds: float) -> None:
        super().__init__(f"cannot reach Redis at {where}: {cause} after {seconds:.0f} s")
        self.where, self.cause, self.seconds = where, cause, seconds


class NotReplicatedError(BuildqError, RuntimeError):
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
