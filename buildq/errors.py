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
