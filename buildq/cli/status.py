"""``buildq status``: a job's state, result and phase waterfall."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import cli_settings
from .quick import show_status


def status(
    job_id: Annotated[str, typer.Argument(help="the job id submit printed")],
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON record")] = False,
) -> None:
    """Show a job's state, result and phase waterfall."""
    from ..client import BuildqClient

    record = BuildqClient(cli_settings()).status(job_id)
    code = show_status(job_id, record, as_json)
    if code:
        raise typer.Exit(code)
