"""``buildq logs``: a build's log, printed or followed."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import EXIT_FAILED, cli_settings, die, state_exit


def logs(
    job_id: Annotated[str, typer.Argument(help="the job whose log to print")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="follow a running build until it ends")
    ] = False,
    raw: Annotated[bool, typer.Option("--raw", help="the rawjson progress lines")] = False,
) -> None:
    """Print a build's log (like buildctl --progress=plain); -f follows it across retries."""
    from ..client import BuildqClient
    from ..store.logs import format_entry, show_attempts

    client = BuildqClient(cli_settings())
    if not follow:
        entries = client.logs(job_id, raw=raw)
        if not entries and client.status(job_id).get("state") == "unknown":
            die(f"unknown job {job_id!r}", EXIT_FAILED)
        several = show_attempts(entries)
        for entry in entries:
            typer.echo(format_entry(entry, show_attempt=several))
        return
    if client.status(job_id).get("state") == "unknown":
        die(f"unknown job {job_id!r}", EXIT_FAILED)
    for entry in client.follow_logs(job_id, raw=raw):
        typer.echo(format_entry(entry, show_attempt=entry.kind == "mark"))
    record = client.store.result(job_id) or {}
    raise typer.Exit(state_exit(record))
