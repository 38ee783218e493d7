"""``buildq logs``: a build's log, printed or followed."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..contract.record import iso
from .common import EXIT_FAILED, cli_settings, die, state_exit


def logs(
    job_id: Annotated[str, typer.Argument(help="the job whose log to print")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="follow a running build until it ends")
    ] = False,
    raw: Annotated[bool, typer.Option("--raw", help="the rawjson progress lines")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per entry: job_id, time, attempt, kind, line")
    ] = False,
) -> None:
    """Print a build's log (like buildctl --progress=plain); -f follows it across retries."""
    from ..client import BuildqClient
    from ..store.logs import LogEntry, format_entry, show_attempts

    def as_object(entry: LogEntry) -> str:
        return json.dumps(
            {"job_id": job_id, "time": entry_time(entry.id), "attempt": entry.attempt, "kind": entry.kind,
             "line": entry.line}
        )  # fmt: skip

    client = BuildqClient(cli_settings())
    if not follow:
        entries = client.logs(job_id, raw=raw)
        if not entries and client.status(job_id).get("state") == "unknown":
            die(f"unknown job {job_id!r}", EXIT_FAILED)
        several = show_attempts(entries)
        for entry in entries:
            typer.echo(as_object(entry) if as_json else format_entry(entry, show_attempt=several))
        return
    if client.status(job_id).get("state") == "unknown":
        die(f"unknown job {job_id!r}", EXIT_FAILED)
    for entry in client.follow_logs(job_id, raw=raw):
        typer.echo(as_object(entry) if as_json else format_entry(entry, show_attempt=entry.kind == "mark"))
    record = client.store.result(job_id) or {}
    raise typer.Exit(state_exit(record))


def entry_time(entry_id: str) -> str | None:
    """When a log entry was written (its stream id's milliseconds), RFC 3339."""
    millis = entry_id.split("-", 1)[0]
    return iso(int(millis) / 1000) if millis.isdigit() else None
