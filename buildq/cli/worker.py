"""``buildq worker``: a build worker (Celery)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import cli_settings


def worker(
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
    """Start a build worker (Celery, task events on, late acks, prefetch 1)."""
    from ..celeryapp.worker import run_worker, worker_argv

    settings = cli_settings()
    argv = worker_argv(
        settings,
        queues=[q for q in (queues or "").split(",") if q],
        concurrency=concurrency,
        autoscale=autoscale,
        pool=pool,
        loglevel=loglevel,
        hostname=hostname,
    )
    run_worker(settings, argv)
