"""``buildq status``: a job's state, result and phase waterfall."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import EXIT_FAILED, cli_settings, die, print_record


def status(
    job_id: Annotated[str, typer.Argument(help="the job id submit printed")],
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON record")] = False,
) -> None:
    """Show a job's state, result and phase waterfall."""
    from ..client import BuildqClient

    record = BuildqClient(cli_settings()).status(job_id)
    if record.get("state") in ("unknown", "lost"):
        if as_json:
            typer.echo(json.dumps(record))
        if record["state"] == "lost":
            die(
                f"job {job_id!r} was submitted at {record.get('enqueued_at')}, before this Redis's buildq "
                "data began: it is lost (Redis restarted without its data? see BUILDQ_REDIS_PERSISTENCE)",
                EXIT_FAILED,
            )
        die(f"unknown job {job_id!r}", EXIT_FAILED)
    print_record(record, as_json)
    if record.get("state") in ("failed", "cancelled"):
        raise typer.Exit(EXIT_FAILED)
