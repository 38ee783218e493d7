"""The job contract: what a producer puts on the queue.

:class:`BuildJob` is strict (unknown fields rejected) and checks every value that ends up in a
buildctl flag, so a ``,``, ``=`` or newline cannot smuggle an extra attribute into
``--output`` / ``--export-cache``. :func:`parse_job` turns any invalid input into one
:class:`~buildq.errors.InvalidJobError` whose ``field`` names the offending field.
Secret *values* never travel in a job: a secret names an environment variable on the worker.

**Attestations** (the end of this module): SLSA provenance and an SPDX SBOM, as the operator
allows them. A job asks with ``provenance`` (``min``, ``max`` or ``none``) and ``sbom`` (true /
false); a field left out takes the operator's default (``BUILDQ_PROVENANCE_DEFAULT``,
``BUILDQ_SBOM_DEFAULT``). :func:`effective_attestations` gives the job with both filled in, or
raises :class:`~buildq.errors.InvalidJobError` naming the field when the operator forbids what it
asks, or when provenance would publish a secret: BuildKit writes the context's URL into the
statement (``invocation.configSource.uri`` and ``materials``, in ``min`` mode too) and every build
arg in ``max`` mode, and a pushed attestation cannot be redacted afterwards (docs/attestations.md).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InvalidJobError
from .grants import normalize_repository
from .reference import parse_reference

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: :data:`JOB_ID_PATTERN` compiled (``fullmatch``-safe: no newline passes ``$`` with ``\Z``)
JOB_ID_PATTERN_RE = re.compile(JOB_ID_PATTERN.replace("$", r"\Z"))
GIT_CONTEXT = re.compile(
    r"^(?:https://|git://|ssh://)[A-Za-z0-9._~:@%+-]+(?:/[A-Za-z0-9._~@%+-]+)*\.git"
    r"(?:#[A-Za-z0-9._/+-]*(?::[A-Za-z0-9._/+-]*)?)?$"
)
_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PLATFORM = re.compile(r"^[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_.]+)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: an http(s) URL of a tar / tar.gz context archive (BuildKit downloads it); no fragment, no spaces
URL_CONTEXT = re.compile(r"^https?://[A-Za-z0-9._~%-]+(?::[0-9]{1,5})?(?:/[^\s#?]*)?(?:\?[^\s#]*)?$")


def new_job_id(now: float | None = None) -> str:
    """A fresh job id: 32 hex characters, the first 12 the creation time in milliseconds (so a
    reader can tell a job submitted before the Redis it asks lost its data), then 80 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


def is_git_context(context: str) -> bool:
    """True when ``context`` is a git URL that BuildKit fetches itself."""
    return bool(GIT_CONTEXT.match(context))


def is_url_context(context: str) -> bool:
    """True when ``context`` is an http(s) URL of a tar / tar.gz archive (not a git URL)."""
    return bool(URL_CONTEXT.match(context)) and not is_git_context(context)


def is_remote_context(context: str) -> bool:
    """True when BuildKit fetches ``context`` itself (a git URL or an archive URL)."""
    return is_git_context(context) or is_url_context(context)


def url_query_values(url: str) -> list[str]:
    """The secret parts of a URL context: each query parameter's value (a presigned URL's token; a
    bare parameter whole); masked as ``***`` in logs and records. Empty for other contexts."""
    if not is_url_context(url) or "?" not in url:
        return []
    values = []
    for part in url.split("?", 1)[1].split("&"):
        name, sep, value = part.partition("=")
        if value or not sep and name:
            values.append(value if sep else name)
    return values


def context_secrets(context: str) -> list[str]:
    """What of a remote context is masked in logs, records and task views: a presigned URL's query
    values (:func:`url_query_values`) and a URL's userinfo (``https://user:TOKEN@host/…``: the
    password, and ``user:TOKEN`` whole)."""
    values = url_query_values(context)
    scheme, sep, rest = context.partition("://")
    userinfo, at, _ = rest.split("/", 1)[0].rpartition("@")
    if sep and at and userinfo:
        values.append(userinfo)
        password = userinfo.partition(":")[2]
        if password:
            values.append(password)
    return values


def _no_control(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain newlines or control characters")
    return value


class SecretRef(BaseModel):
    """A build secret: exposed to ``RUN --mount=type=secret,id=<id>`` from the worker's env var ``env``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class BuildJob(BaseModel):
    """One image build. See docs/jobs.md for each field."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job_id: Annotated[str, Field(pattern=JOB_ID_PATTERN)] = Field(default_factory=new_job_id)
    context: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="absolute directory readable by the worker, https://host/repo.git#ref:subdir, "
        "or an http(s) URL of a tar / tar.gz archive"
    )
    dockerfile: Annotated[str, Field(min_length=1, max_length=1024)] = "Dockerfile"
    target: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] | None = None
    build_args: dict[str, str] = Field(default_factory=dict)
    platforms: list[str] = Field(default_factory=list)
    tags: Annotated[list[str], Field(min_length=1, max_length=32)]
    push: bool = True
    cache_ref: str | None = Field(default=None, description="default: <repository of first tag>:buildcache")
    cache_mode: Literal["max", "min"] = "max"
    labels: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretRef] = Field(default_factory=list)
    timeout_s: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = Field(
        default=None,
        description="seconds; the worker rejects more than its BUILDQ_MAX_TIMEOUT_S (default 14400)",
    )
    priority: Literal["normal", "high"] = "normal"
    retry_of: Annotated[str, Field(pattern=JOB_ID_PATTERN)] | None = Field(
        default=None, description="the job this one runs again (set by buildq retry); shown in its record"
    )

    # -- attestations (docs/attestations.md): null takes the operator's default ----------------
    provenance: Literal["min", "max", "none"] | None = Field(
        default=None,
        description="SLSA provenance attestation (BuildKit's attest:provenance mode); none: no "
        "provenance; null: BUILDQ_PROVENANCE_DEFAULT",
    )
    sbom: bool | None = Field(
        default=None,
        description="an SPDX SBOM attestation made by BUILDQ_SBOM_SCANNER_IMAGE (BuildKit's "
        "attest:sbom); null: BUILDQ_SBOM_DEFAULT",
    )

    # -- cache scopes and superseded builds (docs/cache-scopes.md) ---------------------------------
    cache_scope: str | None = Field(
        default=None,
        description="a branch name, say: the cache is exported to <cache_ref>-<scope> and imported "
        "from there, then from BUILDQ_CACHE_DEFAULT_SCOPE's ref (normalised to a tag-safe suffix)",
    )
    supersede_key: str | None = Field(
        default=None,
        description="a newer job with the same key cancels this one while it is queued or running "
        "([A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199})",
    )

    @field_validator("cache_scope")
    @classmethod
    def _cache_scope(cls, value: str | None) -> str | None:
        return None if value is None else normalise_scope(value)

    @field_validator("supersede_key")
    @classmethod
    def _supersede_key(cls, value: str | None) -> str | None:
        if value is not None and not SUPERSEDE_KEY_RE.fullmatch(value):
            raise ValueError(
                "must be 1-200 characters of letters, digits and ._:/@+- starting with a letter or digit"
            )
        return value

    @field_validator("context")
    @classmethod
    def _context(cls, value: str) -> str:
        _no_control(value, "context")
        if "://" in value or value.startswith("git@"):
            if not is_remote_context(value):
                raise ValueError(
                    "a remote context must be a git URL like https://host/org/repo.git#ref:subdir "
                    "or an http(s) URL of a tar / tar.gz archive (no '#', no spaces)"
                )
            return value
        if not os.path.isabs(value):
            raise ValueError("a local context must be an absolute directory path")
        if "," in value or "=" in value:
            raise ValueError("a local context path must not contain ',' or '='")
        return os.path.normpath(value)

    @field_validator("dockerfile")
    @classmethod
    def _dockerfile(cls, value: str) -> str:
        _no_control(value, "dockerfile")
        if value.startswith("/") or "\\" in value:
            raise ValueError("must be a relative path inside the context")
        norm = posixpath.normpath(value)
        if norm == ".." or norm.startswith("../") or norm == ".":
            raise ValueError("must stay inside the context (no '..')")
        if "," in value or "=" in value:
            raise ValueError("must not contain ',' or '='")
        return norm

    @field_validator("build_args")
    @classmethod
    def _build_args(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ARG_KEY.match(key):
                raise ValueError(f"build arg name {key!r} must match [A-Za-z_][A-Za-z0-9_]*")
            _no_control(val, f"build arg {key}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _LABEL_KEY.match(key) or len(key) > 256:
                raise ValueError(f"label key {key!r} must match [A-Za-z0-9][A-Za-z0-9._/-]*")
            _no_control(val, f"label {key}")
        return value

    @field_validator("platforms")
    @classmethod
    def _platforms(cls, value: list[str]) -> list[str]:
        for platform in value:
            if not _PLATFORM.match(platform):
                raise ValueError(f"platform {platform!r} must look like os/arch[/variant]")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for index, tag in enumerate(value):
            try:
                ref = parse_reference(tag)
            except ValueError as exc:
                raise ValueError(f"tags[{index}]: {exc}") from None
            if ref.digest:
                raise ValueError(f"tags[{index}]: {tag!r} has a digest; push targets take a tag")
        if len(set(value)) != len(value):
            raise ValueError("tags must not repeat")
        return value

    @field_validator("cache_ref")
    @classmethod
    def _cache_ref(cls, value: str | None) -> str | None:
        if value is None:
            return None
        ref = parse_reference(value)
        if ref.digest:
            raise ValueError(f"{value!r} has a digest; a cache ref takes a tag")
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: list[SecretRef]) -> list[SecretRef]:
        ids = [s.id for s in value]
        if len(set(ids)) != len(ids):
            raise ValueError("secret ids must be unique")
        return value

    @model_validator(mode="after")
    def _default_cache_ref(self) -> BuildJob:
        if self.cache_ref is None:
            first = parse_reference(self.tags[0])
            object.__setattr__(self, "cache_ref", f"{first.repository}:buildcache")
        return self

    @property
    def is_git(self) -> bool:
        return is_git_context(self.context)

    @property
    def is_remote(self) -> bool:
        """A git or archive URL: BuildKit fetches it, the worker reads no directory."""
        return is_remote_context(self.context)

    def to_message(self) -> dict[str, Any]:
        """The JSON-able body put on the queue (defaults filled in, so every worker agrees; the
        attestation fields only when the job sets them)."""
        body = self.model_dump(mode="json")
        # attestations left to the worker's defaults are not sent: a worker that predates them
        # (a rolling upgrade) still takes a job that does not ask for any
        for name in ("provenance", "sbom"):
            if body.get(name) is None:
                del body[name]
        return body


def cache_key(job: BuildJob) -> str:
    """The build cache a job uses, as one string: its ``cache_ref`` (``<repository of the first
    tag>:buildcache`` unless the job names one) spelled out, Docker Hub in full and the tag
    explicit (``app:1`` → ``docker.io/library/app:buildcache``; ``team/app`` → ``docker.io/team/app:latest``),
    with the job's ``cache_scope`` added as :func:`scoped_ref` adds it (the ref it exports to).

    Two jobs with the same key read and write the same registry cache, so a daemon that built one
    holds the other's layers too. Cache-affinity routing remembers the daemon per key.
    """
    assert job.cache_ref is not None  # filled in by the validator
    own = scoped_ref(job.cache_ref, job.cache_scope) if job.cache_scope else job.cache_ref
    ref = parse_reference(own)
    return f"{normalize_repository(ref.repository)}:{ref.tag or 'latest'}"


# -- cache scopes (docs/cache-scopes.md) ----------------------------------------------------------

#: what a supersede key may be (it becomes part of a Redis key: no spaces, braces, globs or controls)
SUPERSEDE_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
#: the longest scope suffix kept as it is (longer ones are cut and given a digest of the whole)
SCOPE_MAX = 64
_SCOPE_DROP = re.compile(r"[^a-z0-9_.-]+")


def normalise_scope(scope: str) -> str:
    """A cache scope as a tag-safe suffix: lower case, every run of other characters than
    ``[a-z0-9_.-]`` one ``-``, no leading or trailing ``.``/``-``; over :data:`SCOPE_MAX`
    characters cut and ended by 8 hex digits of the whole scope's digest (two long branch names
    sharing a prefix stay apart). ValueError when nothing is left or the scope has controls."""
    if not isinstance(scope, str) or not 1 <= len(scope) <= 255:
        raise ValueError("must be 1-255 characters")
    _no_control(scope, "cache_scope")
    suffix = _SCOPE_DROP.sub("-", scope.lower()).strip(".-")
    if not suffix:
        raise ValueError(f"{scope!r} has no letter or digit to make a tag suffix of")
    if len(suffix) > SCOPE_MAX:
        digest = hashlib.sha256(scope.encode()).hexdigest()[:8]
        suffix = suffix[: SCOPE_MAX - 9].rstrip(".-") + "-" + digest
    return suffix


def scoped_ref(cache_ref: str, scope: str) -> str:
    """``cache_ref`` with ``-<scope>`` added to its tag (``r/app:buildcache`` + ``pr-7`` →
    ``r/app:buildcache-pr-7``); a tag too long for the grammar (128) is cut before the suffix."""
    ref = parse_reference(cache_ref)
    tag = ref.tag or "latest"
    return f"{ref.repository}:{tag[: 127 - len(scope)]}-{scope}"


def cache_refs(job: BuildJob, default_scope: str | None) -> tuple[str, list[str]]:
    """Where ``job`` exports its cache and where it imports from, in order. No scope: its
    ``cache_ref`` both ways (as before scopes). A scope: exported to its scope's ref; imported
    from it, then from ``default_scope``'s ref (normalised; none when unset or the same scope)."""
    assert job.cache_ref is not None  # filled in by the validator
    if job.cache_scope is None:
        return job.cache_ref, [job.cache_ref]
    own = scoped_ref(job.cache_ref, job.cache_scope)
    imports = [own]
    if default_scope:
        fallback = scoped_ref(job.cache_ref, normalise_scope(default_scope))
        if fallback != own:
            imports.append(fallback)
    return own, imports


def _field_name(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "job"


def parse_job(data: Any) -> BuildJob:
    """Validate a job (a dict, a JSON string or a BuildJob); raise InvalidJobError naming the field."""
    if isinstance(data, BuildJob):
        return data
    try:
        if isinstance(data, str | bytes):
            return BuildJob.model_validate_json(data)
        if not isinstance(data, dict):
            raise InvalidJobError("a job must be a JSON object", field="job")
        return BuildJob.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_name(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        else:
            message = f"{field}: {first.get('msg')}"
            if len(exc.errors()) > 1:
                others = {_field_name(tuple(e.get("loc", ()))) for e in exc.errors()[1:]} - {field}
                if others:
                    message += f" (also invalid: {', '.join(sorted(others))})"
        raise InvalidJobError(message, field=field) from None


def job_schema() -> dict[str, Any]:
    """JSON Schema of the job contract (what ``buildq schema`` prints)."""
    schema = BuildJob.model_json_schema()
    schema["title"] = "buildq BuildJob"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# ----------------------------------------------------------------------------------------------
# Attestations, as the operator allows them (see the module's docstring).

PROVENANCE_MODES = ("min", "max")
#: the provenance values a job may ask for (``none``: no provenance)
PROVENANCE_CHOICES = (*PROVENANCE_MODES, "none")


@dataclass(frozen=True)
class AttestationPolicy:
    """What the operator allows: the defaults and what a job may ask for."""

    provenance_default: str = "none"
    provenance_allowed: Sequence[str] = PROVENANCE_MODES
    sbom_default: bool = False
    sbom_allowed: bool = True


def context_secret_parts(context: str) -> list[str]:
    """The parts of a context URL that must not be published: an archive URL's query values (a
    presigned URL's token) and a git URL's userinfo (``https://user:token@host/…``)."""
    parts = url_query_values(context)
    if is_git_context(context):
        userinfo = urlsplit(context).netloc.rpartition("@")[0]
        if userinfo:
            parts.append(userinfo)
    return parts


def effective_attestations(
    job: BuildJob, policy: AttestationPolicy, *, secret_values: Sequence[str] = ()
) -> BuildJob:
    """``job`` with ``provenance`` and ``sbom`` as they will be built (defaults filled in); raise
    InvalidJobError (field ``provenance`` or ``sbom``) for what the policy forbids, and for
    provenance that would publish the context URL's secret parts or (``max``) a build arg holding
    one of ``secret_values`` (the worker's granted secret values)."""
    asked = job.provenance
    provenance = policy.provenance_default if asked is None else asked
    if asked is not None and asked != "none" and asked not in policy.provenance_allowed:
        allowed = ", ".join(policy.provenance_allowed) or "none"
        raise InvalidJobError(
            f"provenance: {asked!r} is not allowed on this worker (BUILDQ_PROVENANCE_ALLOWED: {allowed})",
            field="provenance",
        )
    if provenance != "none" and context_secret_parts(job.context):
        raise InvalidJobError(
            "provenance: the statement would publish the context URL with its credentials or query "
            "string (a presigned URL's token); use a context URL without them, or provenance: none",
            field="provenance",
        )
    if provenance == "max":
        for key, value in job.build_args.items():
            if any(secret and secret in value for secret in secret_values):
                raise InvalidJobError(
                    f"provenance: max would publish build arg {key}, which holds a granted secret's "
                    "value; pass it as a secret, or use provenance: min",
                    field="provenance",
                )
    sbom = policy.sbom_default if job.sbom is None else job.sbom
    if job.sbom and not policy.sbom_allowed:
        raise InvalidJobError(
            "sbom: SBOMs are not allowed on this worker (BUILDQ_SBOM_ALLOWED)", field="sbom"
        )
    if sbom and not policy.sbom_allowed:
        sbom = False
    return job.model_copy(update={"provenance": provenance, "sbom": sbom})
