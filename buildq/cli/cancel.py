"""``buildq cancel``: cancel a queued or running job."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import EXIT_FAILED, cli_settings, die


def cancel(
    job_id: Annotated[str, typer.Argument(help="the job to cancel")],
    as_json: Annotated[
        bool, typer.Option("--json", help="print the job's record (as status --json)")
    ] = False,
) -> None:
    """Cancel a job: a queued one never starts, a running one is killed within 2 s."""
    from ..client import BuildqClient

    client = BuildqClient(cli_settings())
    state = client.status(job_id).get("state")
    if state == "unknown":
        die(f"unknown job {job_id!r}", EXIT_FAILED)
    if state in ("succeeded", "failed", "cancelled"):
        die(f"job {job_id} already finished ({state}); nothing to cancel", EXIT_FAILED)
    record = client.cancel(job_id)
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(f"cancel requested for {job_id} (state: {record.get('state')})")
