"""``buildq list``: recent jobs and each queue's depth."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import cli_settings


def list_jobs(
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help="only this state (repeatable): queued, running, failed…"),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000, help="at most N jobs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print {jobs, queues} as JSON")] = False,
) -> None:
    """Recent jobs (newest first: state, phase, age, duration, image) and each queue's depth."""
    import time

    from ..client import BuildqClient

    client = BuildqClient(cli_settings())
    rows = client.list_jobs(limit=limit, states=list(state or []))
    depths = client.queue_depths()
    if as_json:
        typer.echo(json.dumps({"jobs": rows, "queues": depths}, indent=2))
        return
    from rich.console import Console

    from .views import render_list

    render_list(rows, depths, time.time(), Console())
