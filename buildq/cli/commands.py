"""The typer ``app`` of the ``buildq`` command: one command a module (see :mod:`buildq.cli`)."""

from __future__ import annotations

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
