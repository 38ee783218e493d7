"""``buildq`` command line: worker, submit, status, cancel, list, retry, logs, health, schema.

Exit codes: 0 success; 1 the build failed or was cancelled (also a job the worker rejected after
it was enqueued), an unknown or lost job, a job that cannot be cancelled or retried, or a failed
upload; 2 invalid input or settings, before anything is enqueued (the reason goes to stderr); 3
timed out waiting; 4 Redis did not answer within ``BUILDQ_REDIS_RETRY_S`` (or too few replicas
confirmed a submission). An expected error is one line on stderr, never a traceback.

One module a command; what they share is in ``common``. A command imports what it needs (rich,
docker, celery, the client) when it runs, so ``buildq --help`` stays quick.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import cancel, health, jobs, logs, retry, schema, status, submit, worker

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="buildq: container-image builds through a Celery queue."
)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"buildq {version('buildq')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("buildq (not installed)")
        raise typer.Exit(0)


@app.callback()
def _options(
    shown: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print buildq's version and exit"),
    ] = False,
) -> None:
    """buildq: container-image builds through a Celery queue."""


# in the order ``buildq --help`` lists them
for _name, _command in (
    ("worker", worker.worker),
    ("submit", submit.submit),
    ("status", status.status),
    ("cancel", cancel.cancel),
    ("list", jobs.list_jobs),
    ("retry", retry.retry),
    ("logs", logs.logs),
    ("health", health.health),
    ("schema", schema.schema),
):
    app.command(name=_name, **getattr(_command, "command_options", {}))(_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # an expected error is one line and its exit code, never a traceback
        code, line = said(exc)
        if code is None:
            raise
        typer.echo(f"buildq: {line}", err=True)
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
