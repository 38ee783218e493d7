"""``buildq`` command line: worker, submit, status, cancel, list, retry, logs, health, schema.

Exit codes: 0 success; 1 the build failed or was cancelled (also a job the worker rejected after
it was enqueued), an unknown or lost job, a job that cannot be cancelled or retried, or a failed
upload; 2 invalid input or settings, before anything is enqueued (the reason goes to stderr); 3
timed out waiting; 4 Redis did not answer within ``BUILDQ_REDIS_RETRY_S`` (or too few replicas
confirmed a submission). An expected error is one line on stderr, never a traceback.

One module a command (the typer ``app`` in ``commands``); what they share is in ``common``. A command
imports what it needs (rich, docker, celery, the client) when it runs, so ``buildq --help`` stays
quick; ``buildq status`` starts without typer, pydantic or redis-py when it can (``quick``).
"""

from __future__ import annotations

import sys
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":  # made on first use: ``buildq status`` may answer without it
        from .commands import app

        return app
    raise AttributeError(name)


def main() -> None:
    try:
        from .quick import run

        code = run(sys.argv[1:])
        if code is not None:
            sys.exit(code)
        from .commands import app

        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # an expected error is one line and its exit code, never a traceback
        code, line = said(exc)
        if code is None:
            raise
        print(f"buildq: {line}", file=sys.stderr)
        sys.exit(code)


def said(exc: BaseException) -> tuple[int | None, str]:
    """The exit code and the one line for an error a command let through (None: unexpected)."""
    from ..errors import BuildqError, InvalidJobError, NotReplicatedError, RedisUnavailable, SettingsError
    from .common import EXIT_FAILED, EXIT_INVALID, EXIT_REDIS

    text = " ".join(str(exc).split())
    if isinstance(exc, RedisUnavailable | NotReplicatedError):
        return EXIT_REDIS, text
    if isinstance(exc, InvalidJobError):
        return EXIT_INVALID, f"invalid job: {exc.message}"
    if isinstance(exc, SettingsError):
        return EXIT_INVALID, text
    if isinstance(exc, BuildqError):
        return EXIT_FAILED, text
    if type(exc).__module__.split(".")[0] == "redis":  # Redis answered with an error of its own
        return EXIT_FAILED, f"Redis: {text}"
    return None, text
