"""``buildq worker``: a build worker (Celery).

Its own options are the ones buildq needs to know; every other option is Celery's and is passed
through to ``celery worker`` as given (``--max-tasks-per-child 50``, ``--max-memory-per-child``,
``--logfile``, ``--pidfile``, ``-O fair``, ``--time-limit`` …), so Celery checks and documents them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import EXIT_INVALID, cli_settings, die


def worker(
    ctx: typer.Context,
    queues: Annotated[
        str | None, typer.Option("--queues", "-Q", help="comma separated queues (default: both)")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="builds at once (pool processes)")
    ] = None,
    autoscale: Annotated[str | None, typer.Option("--autoscale", help="MAX,MIN pool processes")] = None,
    pool: Annotated[str | None, typer.Option("--pool", "-P", help="Celery pool (default prefork)")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="DEBUG|INFO|WARNING|ERROR")] = "INFO",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Celery node name")] = None,
) -> None:
    """Start a build worker (Celery, task events on, late acks, prefetch 1). Other options are
    Celery's worker options, passed through (--max-tasks-per-child N, --logfile F, -O fair …)."""
    from ..celeryapp.worker import PersistenceRefused, run_worker, worker_argv

    settings = cli_settings()
    argv = worker_argv(
        settings,
        queues=[q for q in (queues or "").split(",") if q],
        concurrency=concurrency,
        autoscale=autoscale,
        pool=pool,
        loglevel=loglevel,
        hostname=hostname,
        extra=list(ctx.args),
    )
    try:
        run_worker(settings, argv)
    except PersistenceRefused as exc:
        die(str(exc), EXIT_INVALID)


#: Celery's own worker options are not buildq's to list: unknown ones go through to it
worker.command_options = {  # type: ignore[attr-defined]
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}
}
