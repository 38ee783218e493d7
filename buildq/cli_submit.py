"""The job ``buildq submit`` sends: a job file's fields, overridden by the flags given beside it.

Pure helpers (no Redis): the CLI turns their :class:`~buildq.errors.InvalidJobError` into exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from .contract.grants import check_context_roots
from .contract.job import is_remote_context
from .errors import InvalidJobError


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
