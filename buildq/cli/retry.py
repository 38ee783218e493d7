"""``buildq retry``: submit a failed or cancelled job again as a new job."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import InvalidJobError
from .common import EXIT_FAILED, EXIT_INVALID, cli_settings, die


def retry(
    job_id: Annotated[str, typer.Argument(help="a failed or cancelled job")],
    as_json: Annotated[bool, typer.Option("--json", help="print {job_id, retry_of}")] = False,
) -> None:
    """Submit a failed or cancelled job again as a new job; its record's retry_of names the old one."""
    from ..client import BuildqClient

    try:
        handle = BuildqClient(cli_settings()).retry(job_id)
    except InvalidJobError as exc:
        die(exc.message, EXIT_FAILED if exc.field == "job_id" else EXIT_INVALID)
        return
    typer.echo(json.dumps({"job_id": handle.job_id, "retry_of": job_id}) if as_json else handle.job_id)
