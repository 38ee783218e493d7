"""The ``buildctl build`` command line for a job (buildctl v0.21.0), as a pure function.

The daemon address is not in the argv: launchers pass it as ``BUILDKIT_HOST`` (buildctl's
``--addr`` default). Secret values are not in the argv either: ``--secret id=X,env=VAR``
names an environment variable the launcher sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..jobs import BuildJob
from ..launchers.base import BuildPaths
from ..reference import parse_reference, registry_host


def csv_field(field: str) -> str:
    """Quote one ``key=value`` field for buildctl's CSV parser (Go encoding/csv) when needed."""
    if any(c in field for c in ',"\n\r') or field[:1] == " ":
        return '"' + field.replace('"', '""') + '"'
    return field


def csv_attrs(fields: Iterable[str]) -> str:
    """Join ``key=value`` fields into one CSV attribute string (``--output``, ``--export-cache``)."""
    return ",".join(csv_field(f) for f in fields)


def is_insecure(reference: str, insecure_registries: Sequence[str]) -> bool:
    """True when the reference's registry host[:port] (or bare host) is listed as plain http."""
    host = registry_host(parse_reference(reference))
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in insecure_registries or bare in insecure_registries


def build_argv(job: BuildJob, paths: BuildPaths, *, insecure_registries: Sequence[str] = ()) -> list[str]:
    """Return ``buildctl`` arguments (without the program name) that build and export ``job``."""
    argv = ["build", "--frontend", "dockerfile.v0"]
    dockerfile_dir, filename = _split_dockerfile(job.dockerfile)
    if job.is_git:
        argv += ["--opt", f"context={job.context}"]
        argv += ["--opt", f"filename={job.dockerfile}"]
    else:
        if paths.context_dir is None or paths.dockerfile_dir is None:
            raise ValueError("a local context needs context and dockerfile paths from the launcher")
        argv += ["--local", f"context={paths.context_dir}", "--local", f"dockerfile={paths.dockerfile_dir}"]
        argv += ["--opt", f"filename={filename}"]
    if job.target:
        argv += ["--opt", f"target={job.target}"]
    for key, value in job.build_args.items():
        argv += ["--opt", f"build-arg:{key}={value}"]
    for key, value in job.labels.items():
        argv += ["--opt", f"label:{key}={value}"]
    if job.platforms:
        argv += ["--opt", "platform=" + ",".join(job.platforms)]
    for secret in job.secrets:
        argv += ["--secret", csv_attrs([f"id={secret.id}", f"env={secret.env}"])]

    output = ["type=image", "name=" + ",".join(job.tags), f"push={'true' if job.push else 'false'}"]
    if job.push and any(is_insecure(tag, insecure_registries) for tag in job.tags):
        output.append("registry.insecure=true")
    argv += ["--output", csv_attrs(output)]

    cache_ref = job.cache_ref
    assert cache_ref is not None  # filled in by BuildJob
    cache_insecure = ["registry.insecure=true"] if is_insecure(cache_ref, insecure_registries) else []
    if job.push:
        export = [
            "type=registry",
            f"ref={cache_ref}",
            f"mode={job.cache_mode}",
            "oci-mediatypes=true",
            "image-manifest=true",
            "ignore-error=true",
            *cache_insecure,
        ]
        argv += ["--export-cache", csv_attrs(export)]
    argv += ["--import-cache", csv_attrs(["type=registry", f"ref={cache_ref}", *cache_insecure])]
    argv += ["--progress=rawjson", "--metadata-file", paths.metadata_file]
    return argv


def _split_dockerfile(dockerfile: str) -> tuple[str, str]:
    head, _, tail = dockerfile.rpartition("/")
    return head, tail


def dockerfile_dir(job: BuildJob) -> str | None:
    """Worker-side directory holding the Dockerfile (None for a git context)."""
    if job.is_git:
        return None
    head, _ = _split_dockerfile(job.dockerfile)
    return f"{job.context}/{head}" if head else job.context


def secret_env(job: BuildJob, environ: Mapping[str, str]) -> dict[str, str]:
    """The worker environment variables buildctl needs for the job's secrets.

    Raises KeyError naming the first variable that is not set on the worker.
    """
    out: dict[str, str] = {}
    for secret in job.secrets:
        if secret.env not in environ:
            raise KeyError(secret.env)
        out[secret.env] = environ[secret.env]
    return out
