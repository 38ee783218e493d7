"""The ``buildctl build`` command line for a job (buildctl v0.21.0), as a pure function.

The daemon address is not in the argv: launchers pass it as ``BUILDKIT_HOST`` (buildctl's
``--addr`` default). Secret values are not in the argv either: ``--secret id=X,env=VAR``
names an environment variable the launcher sets, ``--secret id=X,src=FILE`` a file it writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..contract.reference import parse_reference, registry_host


@dataclass(frozen=True)
class BuildRequest:
    """One ``buildctl build`` as plain values; paths are those buildctl sees (a container's mounts).

    A remote context (git URL) has ``remote_context`` and ``filename`` relative to it; a local one
    has ``context_dir`` and ``dockerfile_dir`` and the Dockerfile's bare ``filename``.
    """

    tags: Sequence[str]
    cache_ref: str
    metadata_file: str
    filename: str = "Dockerfile"
    remote_context: str | None = None
    context_dir: str | None = None
    dockerfile_dir: str | None = None
    target: str | None = None
    build_args: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    platforms: Sequence[str] = ()
    #: (id, environment variable) pairs
    secrets: Sequence[tuple[str, str]] = ()
    #: (id, file as buildctl sees it) pairs
    secret_files: Sequence[tuple[str, str]] = ()
    push: bool = True
    cache_mode: str = "max"
    # -- attestations (docs/attestations.md) --
    #: ``min`` / ``max``: BuildKit's ``attest:provenance=mode=…``; None: no provenance
    provenance: str | None = None
    #: the SBOM generator image (``attest:sbom=generator=…``); None: no SBOM
    sbom_generator: str | None = None
    # -- cache scopes (docs/cache-scopes.md) --
    #: the refs imported from, in order (empty: ``cache_ref`` alone)
    import_refs: Sequence[str] = ()
    #: export the cache to ``cache_ref`` (False: this build does not hold the ref's export lease)
    export_cache: bool = True


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


def build_argv(req: BuildRequest, *, insecure_registries: Sequence[str] = ()) -> list[str]:
    """Return ``buildctl`` arguments (without the program name) that build and export ``req``."""
    argv = ["build", "--frontend", "dockerfile.v0"]
    if req.remote_context is not None:
        argv += ["--opt", f"context={req.remote_context}"]
    else:
        if req.context_dir is None or req.dockerfile_dir is None:
            raise ValueError("a local context needs context and dockerfile paths from the launcher")
        argv += ["--local", f"context={req.context_dir}", "--local", f"dockerfile={req.dockerfile_dir}"]
    argv += ["--opt", f"filename={req.filename}"]
    if req.target:
        argv += ["--opt", f"target={req.target}"]
    for key, value in req.build_args.items():
        argv += ["--opt", f"build-arg:{key}={value}"]
    for key, value in req.labels.items():
        argv += ["--opt", f"label:{key}={value}"]
    if req.platforms:
        argv += ["--opt", "platform=" + ",".join(req.platforms)]
    argv += attestation_opts(req)
    for secret_id, env in req.secrets:
        argv += ["--secret", csv_attrs([f"id={secret_id}", f"env={env}"])]
    for secret_id, path in req.secret_files:
        argv += ["--secret", csv_attrs([f"id={secret_id}", f"src={path}"])]

    output = ["type=image", "name=" + ",".join(req.tags), f"push={'true' if req.push else 'false'}"]
    if req.push and any(is_insecure(tag, insecure_registries) for tag in req.tags):
        output.append("registry.insecure=true")
    argv += ["--output", csv_attrs(output)]

    cache_insecure = ["registry.insecure=true"] if is_insecure(req.cache_ref, insecure_registries) else []
    if req.push and req.export_cache:
        export = [
            "type=registry",
            f"ref={req.cache_ref}",
            f"mode={req.cache_mode}",
            "oci-mediatypes=true",
            "image-manifest=true",
            "ignore-error=true",
            *cache_insecure,
        ]
        argv += ["--export-cache", csv_attrs(export)]
    for ref in req.import_refs or [req.cache_ref]:
        insecure = ["registry.insecure=true"] if is_insecure(ref, insecure_registries) else []
        argv += ["--import-cache", csv_attrs(["type=registry", f"ref={ref}", *insecure])]
    argv += ["--progress=rawjson", "--metadata-file", req.metadata_file]
    return argv


def attestation_opts(req: BuildRequest) -> list[str]:
    """The ``--opt attest:…`` arguments of ``req``: provenance in its mode, an SBOM by its generator."""
    opts: list[str] = []
    if req.provenance is not None:
        opts += ["--opt", f"attest:provenance=mode={req.provenance}"]
    if req.sbom_generator is not None:
        opts += ["--opt", f"attest:sbom=generator={req.sbom_generator}"]
    return opts


def split_dockerfile(dockerfile: str) -> tuple[str, str]:
    """``("dir/sub", "Dockerfile.x")`` for ``"dir/sub/Dockerfile.x"`` (``""`` for no folder)."""
    head, _, tail = dockerfile.rpartition("/")
    return head, tail


#: the media types of an image index (BuildKit pushes one for several platforms, or any attestation)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def is_index(media_type: str | None) -> bool:
    """True for an OCI image index or a Docker manifest list."""
    return media_type in INDEX_TYPES


def pushed_index(metadata: Mapping[str, Any] | None) -> str | None:
    """The digest of the image index buildctl's ``--metadata-file`` says the build made (its
    ``containerimage.descriptor``); None for a plain manifest or no image."""
    metadata = metadata or {}
    descriptor, digest = metadata.get("containerimage.descriptor"), metadata.get("containerimage.digest")
    media_type = descriptor.get("mediaType") if isinstance(descriptor, dict) else None
    return digest if isinstance(digest, str) and is_index(media_type) else None
