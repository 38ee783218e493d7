"""``buildq schema``: the JSON Schema of a build job, or of its record."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def schema(
    record: Annotated[bool, typer.Option("--record", help="the job record's schema instead")] = False,
) -> None:
    """Print the JSON Schema of a build job (for producers in other languages), or of its record."""
    if record:
        from ..contract.record import record_schema

        typer.echo(json.dumps(record_schema(), indent=2))
        return
    from ..contract.job import job_schema

    typer.echo(json.dumps(job_schema(), indent=2))
