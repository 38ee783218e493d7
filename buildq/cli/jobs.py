"""``buildq list``: recent jobs and each queue's depth."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from typing import Annotated

import typer

from ..contract.record import FINISHED_STATES
from .common import EXIT_INVALID, cli_settings, die

#: what ``--state`` accepts
LIST_STATES = ("queued", "running", *FINISHED_STATES)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration back from ``now`` (``90s``, ``30m``, ``2h``, ``7d``) or an RFC 3339
    time (``2026-12-01T08:00:00Z``; with an offset) → epoch seconds. ValueError otherwise."""
    duration = _DURATION.match(text.strip())
    if duration:
        return now - float(duration.group(1)) * _UNIT_S[duration.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (90s, 30m, 2h, 7d) nor an RFC 3339 time (2026-12-01T08:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (add Z or an offset such as +02:00)")
    return moment.timestamp()


def list_jobs(
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help="only this state (repeatable): " + ", ".join(LIST_STATES)),
    ] = None,
    repo: Annotated[
        list[str] | None,
        typer.Option("--repo", help="only jobs with a tag in this repository (repeatable; * ? wildcards)"),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="only jobs with this tag (repeatable; * ? wildcards)")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="only jobs enqueued since: a duration (30m, 2h, 7d) or an RFC 3339 time"
        ),
    ] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option("--worker", help="only jobs whose current or last attempt ran there (host or host:pid)"),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000, help="at most N jobs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print {jobs, queues} as JSON")] = False,
) -> None:
    """Recent jobs (newest first: state, phase, age, duration, image) and each queue's depth.
    Piped, one tab-separated line per job."""
    import time

    now = time.time()
    bad = [s for s in state or () if s not in LIST_STATES]
    if bad:
        die(f"--state: {bad[0]!r} is not a state (one of {', '.join(LIST_STATES)})", EXIT_INVALID)
    start = None
    if since is not None:
        try:
            start = parse_since(since, now)
        except ValueError as exc:
            die(f"--since: {exc}", EXIT_INVALID)
    from ..client import BuildqClient

    client = BuildqClient(cli_settings())
    rows = client.list_jobs(
        limit=limit,
        states=list(state or []),
        since=start,
        repos=repo or (),
        tags=tag or (),
        workers=worker or (),
    )
    depths = client.queue_depths()
    if as_json:
        typer.echo(json.dumps({"jobs": rows, "queues": depths}, indent=2))
        return
    from .views import list_for_pipe, render_list

    if not sys.stdout.isatty():
        for line in list_for_pipe(rows, depths, now):
            typer.echo(line)
        return
    from rich.console import Console

    render_list(rows, depths, now, Console())
