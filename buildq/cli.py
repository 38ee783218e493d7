"""``buildq`` command line: worker, submit, status, cancel, list, retry, logs, health, schema.

Exit codes: 0 success; 1 the build failed or was cancelled (also a job the worker rejected after
it was enqueued), an unknown job, a job that cannot be cancelled or retried, or a failed upload;
2 invalid input or settings, before anything is enqueued (the reason goes to stderr); 3 timed
out waiting.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from .config import Settings, SettingsError, load_settings
from .errors import InvalidJobError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="buildq: container-image builds through a Celery queue."
)

EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT = 1, 2, 3
_CONTEXT_HELP = "directory (on the worker, or sent with --upload), git URL or archive URL"


def _die(message: str, code: int) -> None:
    typer.echo(f"buildq: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        _die(str(exc), EXIT_INVALID)
        raise  # unreachable


def _state_exit(record: dict[str, Any]) -> int:
    return 0 if record.get("state") == "succeeded" else EXIT_FAILED


@app.command()
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
    from .celeryapp.worker import run_worker, worker_argv

    settings = _settings()
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


@app.command()
def submit(
    context: Annotated[
        str | None,
        typer.Option("--context", help=_CONTEXT_HELP),
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="image reference (repeatable)")] = None,
    dockerfile: Annotated[
        str | None, typer.Option("--dockerfile", "-f", help="path inside the context (default Dockerfile)")
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help="build stage")] = None,
    build_arg: Annotated[list[str] | None, typer.Option("--build-arg", help="KEY=VALUE (repeatable)")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE (repeatable)")] = None,
    platform: Annotated[list[str] | None, typer.Option("--platform", help="os/arch (repeatable)")] = None,
    cache_ref: Annotated[
        str | None, typer.Option("--cache-ref", help="registry cache ref (default <repo>:buildcache)")
    ] = None,
    cache_mode: Annotated[str | None, typer.Option("--cache-mode", help="max | min")] = None,
    no_push: Annotated[bool, typer.Option("--no-push", help="build only, push nothing")] = False,
    secret: Annotated[list[str] | None, typer.Option("--secret", help="id=ID,env=VAR (repeatable)")] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", help="job id (default: random)")] = None,
    timeout: Annotated[
        int | None,
        typer.Option(
            "--timeout", help="build time limit, seconds; at most the worker's BUILDQ_MAX_TIMEOUT_S (14400)"
        ),
    ] = None,
    priority: Annotated[str | None, typer.Option("--priority", help="normal | high")] = None,
    job_file: Annotated[
        str | None, typer.Option("--job-file", help="JSON job ('-': stdin); flags override it")
    ] = None,
    upload: Annotated[
        bool, typer.Option("--upload", help="upload the context dir to BUILDQ_CONTEXT_REPOSITORY")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="block until the build ends")] = False,
    wait_timeout: Annotated[
        float | None, typer.Option("--wait-timeout", help="seconds --wait waits (exit 3 after)")
    ] = None,
    progress: Annotated[
        str, typer.Option("--progress", help="--wait: auto (live on a tty) | plain (log) | quiet")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON record")] = False,
) -> None:
    """Validate and enqueue a build; print its job id (with --wait, its result)."""
    from .cli_submit import local_context, merge_job, pairs, read_job_file, secrets_of
    from .cli_wait import wait_for
    from .client import BuildqClient
    from .client.upload import UploadError

    settings = _settings()
    if progress not in ("auto", "plain", "quiet"):
        _die(f"--progress: expected auto, plain or quiet, got {progress!r}", EXIT_INVALID)
    try:
        base = read_job_file(job_file) if job_file else {}
        flags = {
            "context": context,
            "tags": list(tag) if tag else None,
            "push": False if no_push else None,
            "job_id": job_id,
            "dockerfile": dockerfile,
            "target": target,
            "cache_ref": cache_ref,
            "cache_mode": cache_mode,
            "timeout_s": timeout,
            "priority": priority,
            "build_args": pairs(build_arg, "--build-arg") if build_arg else None,
            "labels": pairs(label, "--label") if label else None,
            "platforms": list(platform) if platform else None,
            "secrets": secrets_of(secret) if secret else None,
        }
        job = local_context(merge_job(base, flags), upload=upload, context_roots=settings.context_roots)
        client = BuildqClient(settings)
        handle = client.submit(job, upload=upload)
    except InvalidJobError as exc:
        _die(f"invalid job: {exc.message}", EXIT_INVALID)
        return
    except UploadError as exc:
        _die(f"upload failed: {exc}", EXIT_FAILED)
        return
    if upload and client.last_upload is not None and not as_json:
        sent = "uploaded" if client.last_upload.sent else "already in the registry"
        typer.echo(f"context {client.last_upload.digest} ({client.last_upload.size} bytes) {sent}", err=True)
    if not wait:
        typer.echo(json.dumps({"job_id": handle.job_id}) if as_json else handle.job_id)
        return
    if not as_json:
        typer.echo(handle.job_id, err=True)
    try:
        record = wait_for(client, handle.job_id, wait_timeout, "quiet" if as_json else progress)
    except TimeoutError as exc:
        _die(str(exc), EXIT_TIMEOUT)
        return
    _print_record(record, as_json)
    raise typer.Exit(_state_exit(record))


def _print_record(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    from .render import render_record

    render_record(record)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="the job id submit printed")],
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON record")] = False,
) -> None:
    """Show a job's state, result and phase waterfall."""
    from .client import BuildqClient

    record = BuildqClient(_settings()).status(job_id)
    if record.get("state") == "unknown":
        if as_json:
            typer.echo(json.dumps(record))
        _die(f"unknown job {job_id!r}", EXIT_FAILED)
    _print_record(record, as_json)
    if record.get("state") in ("failed", "cancelled"):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="the job to cancel")]) -> None:
    """Cancel a job: a queued one never starts, a running one is killed within 2 s."""
    from .client import BuildqClient

    client = BuildqClient(_settings())
    state = client.status(job_id).get("state")
    if state == "unknown":
        _die(f"unknown job {job_id!r}", EXIT_FAILED)
    if state in ("succeeded", "failed", "cancelled"):
        _die(f"job {job_id} already finished ({state}); nothing to cancel", EXIT_FAILED)
    record = client.cancel(job_id)
    typer.echo(f"cancel requested for {job_id} (state: {record.get('state')})")


@app.command(name="list")
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

    from .client import BuildqClient

    client = BuildqClient(_settings())
    rows = client.list_jobs(limit=limit, states=list(state or []))
    depths = client.queue_depths()
    if as_json:
        typer.echo(json.dumps({"jobs": rows, "queues": depths}, indent=2))
        return
    from rich.console import Console

    from .cli_views import render_list

    render_list(rows, depths, time.time(), Console())


@app.command()
def retry(
    job_id: Annotated[str, typer.Argument(help="a failed or cancelled job")],
    as_json: Annotated[bool, typer.Option("--json", help="print {job_id, retry_of}")] = False,
) -> None:
    """Submit a failed or cancelled job again as a new job; its record's retry_of names the old one."""
    from .client import BuildqClient

    try:
        handle = BuildqClient(_settings()).retry(job_id)
    except InvalidJobError as exc:
        _die(exc.message, EXIT_FAILED if exc.field == "job_id" else EXIT_INVALID)
        return
    typer.echo(json.dumps({"job_id": handle.job_id, "retry_of": job_id}) if as_json else handle.job_id)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="the job whose log to print")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="follow a running build until it ends")
    ] = False,
    raw: Annotated[bool, typer.Option("--raw", help="the rawjson progress lines")] = False,
) -> None:
    """Print a build's log (like buildctl --progress=plain); -f follows it across retries."""
    from .client import BuildqClient
    from .store.logs import format_entry, show_attempts

    client = BuildqClient(_settings())
    if not follow:
        entries = client.logs(job_id, raw=raw)
        if not entries and client.status(job_id).get("state") == "unknown":
            _die(f"unknown job {job_id!r}", EXIT_FAILED)
        several = show_attempts(entries)
        for entry in entries:
            typer.echo(format_entry(entry, show_attempt=several))
        return
    if client.status(job_id).get("state") == "unknown":
        _die(f"unknown job {job_id!r}", EXIT_FAILED)
    for entry in client.follow_logs(job_id, raw=raw):
        typer.echo(format_entry(entry, show_attempt=entry.kind == "mark"))
    record = client.store.result(job_id) or {}
    raise typer.Exit(_state_exit(record))


@app.command()
def health(as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False) -> None:
    """Check the broker, each BuildKit daemon (buildctl debug workers) and the Docker engine."""
    from .health import check_health, render_health

    report = check_health(_settings())
    if as_json:
        checks = [
            {"name": c.name, "ok": c.ok, "detail": c.detail, "seconds": round(c.seconds, 3)}
            for c in report.checks
        ]
        daemons = [
            {"daemon": d.daemon, "up": d.up, "since": d.since, "error": d.error} for d in report.daemons
        ]
        typer.echo(json.dumps({"ok": report.ok, "checks": checks, "daemons": daemons}, indent=2))
    else:
        from rich.console import Console

        Console().print(render_health(report))  # the terminal's width (80 when not a terminal)
    raise typer.Exit(0 if report.ok else EXIT_FAILED)


@app.command()
def schema(
    record: Annotated[bool, typer.Option("--record", help="the job record's schema instead")] = False,
) -> None:
    """Print the JSON Schema of a build job (for producers in other languages), or of its record."""
    if record:
        from .contract.record import record_schema

        typer.echo(json.dumps(record_schema(), indent=2))
        return
    from .contract.job import job_schema

    typer.echo(json.dumps(job_schema(), indent=2))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
