"""``buildq submit``: the job it sends is a job file's fields, overridden by the flags given beside
it, then validated and enqueued (``--upload``: the context directory sent first; ``--wait``: the
result waited for).

The job's assembly is pure helpers (no Redis): the command turns their
:class:`~buildq.errors.InvalidJobError` into exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Annotated, Any

import typer

from ..contract.grants import check_context_roots
from ..errors import InvalidJobError
from .common import EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, cli_settings, die, print_record, state_exit

_CONTEXT_HELP = "directory (on the worker, or sent with --upload), git URL or archive URL"


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
    cache_scope: Annotated[
        str | None, typer.Option("--cache-scope", help="branch: its own cache ref, then the default scope's")
    ] = None,
    supersede_key: Annotated[
        str | None, typer.Option("--supersede-key", help="a newer job with this key cancels this one")
    ] = None,
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
    # -- attestations (docs/attestations.md) --
    provenance: Annotated[
        str | None, typer.Option("--provenance", help="min | max | none (default: the worker's)")
    ] = None,
    sbom: Annotated[
        bool | None, typer.Option("--sbom/--no-sbom", help="an SPDX SBOM attestation (default: the worker's)")
    ] = None,
) -> None:
    """Validate and enqueue a build; print its job id (with --wait, its result)."""
    from ..client import BuildqClient
    from ..client.upload import UploadError
    from .wait import wait_for

    settings = cli_settings()
    if progress not in ("auto", "plain", "quiet"):
        die(f"--progress: expected auto, plain or quiet, got {progress!r}", EXIT_INVALID)
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
            "cache_scope": cache_scope,
            "supersede_key": supersede_key,
            "timeout_s": timeout,
            "priority": priority,
            "build_args": pairs(build_arg, "--build-arg") if build_arg else None,
            "labels": pairs(label, "--label") if label else None,
            "platforms": list(platform) if platform else None,
            "secrets": secrets_of(secret) if secret else None,
            "provenance": provenance,
            "sbom": sbom,
        }
        job = local_context(merge_job(base, flags), upload=upload, context_roots=settings.context_roots)
        client = BuildqClient(settings)
        handle = client.submit(job, upload=upload)
    except InvalidJobError as exc:
        die(f"invalid job: {exc.message}", EXIT_INVALID)
        return
    except UploadError as exc:
        die(f"upload failed: {exc}", EXIT_FAILED)
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
        die(str(exc), EXIT_TIMEOUT)
        return
    print_record(record, as_json)
    raise typer.Exit(state_exit(record))


def read_job_file(path: str, stdin: IO[str] | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` (``-``: standard input); InvalidJobError names ``job-file``."""
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise InvalidJobError(f"--job-file: cannot read {path!r}: {exc.strerror}", field="job-file") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidJobError(f"--job-file: {path!r} is not JSON: {exc}", field="job-file") from None
    except RecursionError:
        message = f"--job-file: {path!r} is nested too deeply to be a job"
        raise InvalidJobError(message, field="job-file") from None
    if not isinstance(data, dict):
        raise InvalidJobError(f"--job-file: {path!r} must hold a JSON object (one job)", field="job-file")
    return data


def pairs(values: Sequence[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; InvalidJobError names the option."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidJobError(f"{option} expects KEY=VALUE, got {item!r}", field=option)
        out[key] = value
    return out


def secrets_of(items: Sequence[str]) -> list[dict[str, str]]:
    """``id=ID,env=VAR`` items as a job's secrets."""
    out = []
    for item in items:
        fields = dict(part.partition("=")[::2] for part in item.split(","))
        if set(fields) != {"id", "env"}:
            raise InvalidJobError(f"--secret expects id=ID,env=VAR, got {item!r}", field="--secret")
        out.append(fields)
    return out


def merge_job(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The job file's fields with every flag that was given (not None) in their place."""
    job = dict(base)
    job.update({key: value for key, value in flags.items() if value is not None})
    return job


def local_context(job: dict[str, Any], *, upload: bool, context_roots: Sequence[str]) -> dict[str, Any]:
    """A directory context made absolute (relative to the current directory) and checked here:
    it must exist, and, unless it is uploaded, lie under ``BUILDQ_CONTEXT_ROOTS``."""
    from ..contract.job import is_remote_context

    context = job.get("context")
    if not isinstance(context, str) or not context:
        raise InvalidJobError("context: missing (--context, or the job file's context)", field="context")
    if is_remote_context(context) or "://" in context or context.startswith("git@"):
        if upload:
            raise InvalidJobError("context: --upload needs a local directory, not a URL", field="context")
        return job
    context = os.path.abspath(context)
    if not os.path.isdir(context):
        raise InvalidJobError(f"context: {context!r} is not a directory", field="context")
    if not upload:  # the CLI builds from a directory it can see: check it against the roots here too
        check_context_roots(context, context_roots)
    return {**job, "context": context}
