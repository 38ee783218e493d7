"""The one settings object of buildq.

Every knob is an environment variable with the prefix ``BUILDQ_`` (``BUILDQ_BROKER_URL`` …), read
by pydantic-settings. :func:`load_settings` builds it once at start (rejecting unknown ``BUILDQ_*``
variables first, with the closest setting's name when one is close); everything else receives it
as an argument. An unknown variable or an invalid value fails at start with an error that names
the variable. ``BUILDQ_STACK_*`` (the compose stack's own variables) and ``BUILDQ_TEST_*`` (the
test suite's) are outside the settings: no setting is named so, and they are never read here.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from .contract.grants import validate_repository_pattern
from .contract.job import normalise_scope
from .contract.reference import parse_reference
from .errors import SettingsError

ENV_PREFIX = "BUILDQ_"
#: variables with these prefixes are not settings (the compose stack's, the test suite's): ignored
NOT_SETTINGS_PREFIXES = ("BUILDQ_STACK_", "BUILDQ_TEST_")
#: the compose stack's variables (docker-compose.yml), suggested when an unknown name is close to one
STACK_VARIABLES = ("BUILDQ_STACK_REGISTRY_PORT",)
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
_ENV_PATTERN = re.compile(r"^[A-Za-z0-9_*?\[\]!]+$")

#: the environment :func:`load_settings` was asked to read (``os.environ`` when None)
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("buildq_environ", default=None)


def derived_deployment(redis_url: str, sentinel_master: str | None = None) -> str:
    """``r-<12 hex>`` from the Redis a deployment keeps its state in (scheme, host, port, DB, path;
    for Sentinel: the master's name and DB, whichever sentinels are listed)."""
    parts = urlsplit(redis_url.split(";")[0])
    where = f"{parts.scheme}://{parts.hostname or ''}:{parts.port or ''}{parts.path}?{parts.query}"
    if parts.scheme == "sentinel":
        where = f"sentinel://{sentinel_master or ''}/{parts.path.strip('/') or '0'}"
    return "r-" + hashlib.sha256(where.encode()).hexdigest()[:12]


def _where(url: str) -> tuple[str, str, int | None, str]:
    """What names a Redis DB in a URL: scheme family, host, port, DB (sentinel: only the DB counts,
    the master is ``BUILDQ_SENTINEL_MASTER`` whatever sentinels are listed)."""
    parts = urlsplit(url.split(";")[0])
    db = parts.path.strip("/") or "0"
    if parts.scheme == "sentinel":
        return ("sentinel", "", None, db)
    if parts.scheme == "unix":
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        return ("unix", parts.path, None, query.get("db", "0"))
    return ("redis", parts.hostname or "", parts.port or 6379, db)


def same_redis(a: str, b: str) -> bool:
    """Whether two Redis URLs name the same DB of the same server (or of the same Sentinel master)."""
    return _where(a) == _where(b)


def is_redis_url(url: str) -> bool:
    """True for a ``redis://``, ``rediss://``, ``unix://`` or ``sentinel://`` URL."""
    return url.startswith(REDIS_SCHEMES)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _compiled(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    return patterns


def _env_patterns(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not _ENV_PATTERN.match(pattern):
            raise ValueError(f"{pattern!r} is not a variable name pattern (letters, digits, _, * ? [ ])")
    return patterns


def _absolute_dirs(roots: list[str]) -> list[str]:
    for root in roots:
        if not os.path.isabs(root):
            raise ValueError(f"{root!r} is not an absolute directory")
    return [os.path.normpath(root) for root in roots]


def _repository_patterns(patterns: list[str]) -> list[str]:
    return [validate_repository_pattern(pattern) for pattern in patterns]


def _provenance_modes(modes: list[str]) -> list[str]:
    for mode in modes:
        if mode not in ("min", "max"):
            raise ValueError(f"{mode!r} is not a provenance mode (min, max)")
    return modes


def _image_reference(value: str) -> str:
    try:
        parse_reference(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an image reference: {exc}") from None
    if "," in value or "=" in value:
        raise ValueError(f"{value!r} must not contain ',' or '='")
    return value


#: a comma separated list in one variable (``NoDecode``: not JSON)
Csv = Annotated[list[str], NoDecode, BeforeValidator(_split_csv)]

#: what ``BUILDQ_GIT_TRANSPORTS`` may list
GIT_TRANSPORTS = ("https", "git", "ssh")


def _git_transports(values: list[str]) -> list[str]:
    unknown = [v for v in values if v not in GIT_TRANSPORTS]
    if unknown:
        expected = ", ".join(GIT_TRANSPORTS)
        raise ValueError(f"unknown git transport {unknown[0]!r} (expected some of {expected})")
    return values


class Settings(BaseSettings):
    """Validated configuration; see docs/settings.md for each field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    #: the Redis that is the broker and keeps buildq's state (queues, job records, leases, logs)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    #: the same Redis as the broker, spelled another way (e.g. other sentinels); default: the broker
    redis_url: str | None = None

    launcher: Literal["docker", "local"] = "docker"
    buildkit_host: str = "tcp://127.0.0.1:1234"
    #: several daemons, comma separated; when set it replaces ``buildkit_host``
    buildkit_hosts: Csv = Field(default_factory=list)
    #: concurrent builds allowed per daemon (a Redis lease semaphore)
    buildkit_max_builds: int = Field(default=4, ge=1, le=1000)
    buildctl_image: str = "moby/buildkit:v0.21.0"
    buildctl_path: str = "buildctl"
    #: local launcher: where pid files and metadata files go (default: /dev/shm/buildq-local
    #: when /dev/shm is writable, else <tmp>/buildq-local); all workers of a host must agree
    local_state_dir: str | None = None
    insecure_registries: Csv = Field(default_factory=list)

    #: docker launcher: engine URL (default: the SDK's DOCKER_HOST / local socket)
    docker_url: str | None = None
    #: docker launcher: network mode of the buildctl container (``host``, ``bridge``, a network)
    docker_network: str = "host"
    docker_pull_timeout_s: float = Field(default=300.0, gt=0)

    queue: str = "builds"
    high_priority_queue: str = "builds.high"

    default_timeout_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    max_timeout_s: int = Field(default=4 * 3600, ge=1, le=7 * 24 * 3600)

    retry_max_attempts: int = Field(default=5, ge=1, le=100)
    retry_backoff_base_s: float = Field(default=1.0, ge=0)
    retry_backoff_cap_s: float = Field(default=60.0, ge=0)
    #: extra regular expressions whose match in buildctl's error text means "transient"
    transient_patterns: Annotated[Csv, AfterValidator(_compiled)] = Field(default_factory=list)

    #: seconds a job lease lives without renewal (renewed every third of it while building)
    lease_ttl_s: float = Field(default=30.0, gt=0)
    #: broker visibility timeout; must exceed max_timeout_s + retry_backoff_cap_s
    visibility_timeout_s: int = Field(default=6 * 3600, ge=1)
    #: seconds a worker's task events (Flower's view) wait to be published together (0: at once)
    event_batch_s: float = Field(default=0.1, ge=0, le=5)
    #: seconds a warm shutdown waits for running builds
    shutdown_grace_s: float = Field(default=600.0, ge=0)
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    #: a submitted job never claimed after this long, whose message is in no queue, is sent again
    requeue_lost_after_s: float = Field(default=60.0, gt=0)

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_dir: str | None = None
    #: the worker's log lines: Celery's text, or one JSON object per line
    log_format: Literal["text", "json"] = "text"

    #: names of worker environment variables whose values are masked in logs and records
    #: (registry passwords and the like; ``--secret`` values are always masked)
    redact_env: Csv = Field(default_factory=list)

    log_stream_maxlen: int = Field(default=20000, ge=100)
    log_stream_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    #: output bytes kept of one attempt's log (what buildctl printed; 0: no cap); past it one line
    #: says the log was cut, and how much was dropped at its end
    log_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    #: where finished jobs' logs and records are kept (a folder every worker and reader shares);
    #: unset: logs stay in Redis (capped) and records until BUILDQ_RESULT_TTL_S
    archive_dir: str | None = None
    #: how long Redis keeps a finished job's log once it is archived (followers read its end there)
    log_archived_ttl_s: int = Field(default=300, ge=1)
    #: how long Redis keeps a finished job's hash (its record) once the record is archived;
    #: readers then get it from the archive
    archived_record_ttl_s: int = Field(default=24 * 3600, ge=60)
    #: also write Celery's result backend (the BUILDING state, the task's result) for producers
    #: that poll AsyncResult; buildq's own record needs none of it
    task_results: bool = False

    #: how long a job waits for a BuildKit daemon to come back when every daemon is down
    daemon_wait_s: float = Field(default=600.0, gt=0)
    #: how long a job keeps retrying while its registry is away (down, 5xx, 429), backing off
    registry_wait_s: float = Field(default=600.0, gt=0)
    #: how long a daemon whose own state failed a build (a full disk) gets no builds, probes or not
    daemon_hold_s: float = Field(default=60.0, ge=0)
    #: how long a command waits for Redis (a restart, a Sentinel failover) before it gives up
    redis_retry_s: float = Field(default=30.0, ge=0)
    #: a worker checks at start that Redis keeps an append-only file: ``require`` (refuse to start
    #: without one), ``warn`` (say so loudly and start), ``ignore``
    redis_persistence: Literal["require", "warn", "ignore"] = "warn"
    #: the name of this deployment: a worker reaps only its own deployment's leftover buildctl runs
    #: (default: derived from the state Redis address and DB)
    deployment: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

    #: worker variables a job may name as secrets (shell-style patterns); unset: no secrets
    secret_env: Annotated[Csv, AfterValidator(_env_patterns)] = Field(default_factory=list)
    #: absolute directories local contexts must lie under (symlinks resolved); unset: anywhere
    context_roots: Annotated[Csv, AfterValidator(_absolute_dirs)] = Field(default_factory=list)
    #: repository patterns every tag and cache_ref must match; unset: any repository
    allowed_repositories: Annotated[Csv, AfterValidator(_repository_patterns)] = Field(default_factory=list)
    #: git transports a git context may use; ``ssh`` (the daemon host's ssh keys) only when listed
    git_transports: Annotated[Csv, AfterValidator(_git_transports)] = Field(
        default_factory=lambda: ["https", "git"]
    )
    #: producers: the registry repository ``submit --upload`` puts contexts in (host[:port]/repo)
    context_repository: str | None = None
    #: producers: the largest packed context ``submit --upload`` sends (bytes of the tar.gz)
    context_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1)

    #: route a build to the daemon that last built with its cache (when it is up and has room)
    cache_affinity: bool = True
    #: how long a build waits for that daemon when it is full before taking the least loaded one
    affinity_wait_s: float = Field(default=2.0, ge=0, le=600)
    #: the scope every scoped build falls back to importing (a branch name, e.g. ``main``); unset:
    #: a scoped build imports its own scope only (docs/cache-scopes.md)
    cache_default_scope: Annotated[str, AfterValidator(normalise_scope)] | None = None
    #: how long a build waits for an older build of its cache ref to finish exporting before it
    #: launches without exporting (``cache.export: skipped_busy``); 0: it never waits
    cache_export_wait_s: float = Field(default=0.0, ge=0, le=3600)
    #: how many of a repository's last successful builds a build's phases are compared with
    baseline_n: int = Field(default=50, ge=5, le=1000)
    #: docker launcher: one warm buildctl container per worker process (false: one per build)
    docker_warm: bool = True
    #: Redis Sentinel: the master's name (required with ``sentinel://`` URLs) and the sentinels' password
    sentinel_master: str | None = None
    sentinel_password: SecretStr | None = None
    #: replicas a submission, a claim and a result must reach (``WAIT``) before they count;
    #: unset: 1 while the master has a replica, else 0
    submit_replicas: int | None = Field(default=None, ge=0, le=16)
    #: how long one ``WAIT`` for the replicas may block
    replica_wait_timeout_s: float = Field(default=2.0, gt=0, le=60)

    # -- attestations (docs/attestations.md) ---------------------------------------------------
    #: provenance a job gets when it does not say: ``none``, ``min`` or ``max``
    provenance_default: Literal["none", "min", "max"] = "none"
    #: provenance modes a job may ask for (empty: none; ``none`` is always allowed)
    provenance_allowed: Annotated[Csv, AfterValidator(_provenance_modes)] = Field(
        default_factory=lambda: ["min", "max"]
    )
    #: an SBOM for a job that does not say
    sbom_default: bool = False
    #: whether a job may ask for an SBOM (false: ``sbom: true`` is rejected, the default is off)
    sbom_allowed: bool = True
    #: the SBOM generator image BuildKit runs (its scanner protocol); pulled by the daemon
    sbom_scanner_image: Annotated[str, AfterValidator(_image_reference)] = (
        "docker/buildkit-syft-scanner:stable-1"
    )
    #: how long a worker may spend reading a pushed index back (its platforms, attestations), all
    #: reads together; a third of BUILDQ_LEASE_TTL_S at most is used
    registry_read_timeout_s: float = Field(default=10.0, gt=0, le=60)

    @model_validator(mode="after")
    def _check_attestations(self) -> Settings:
        if self.provenance_default != "none" and self.provenance_default not in self.provenance_allowed:
            raise ValueError(
                f"BUILDQ_PROVENANCE_DEFAULT ({self.provenance_default}) must be one of "
                "BUILDQ_PROVENANCE_ALLOWED (or none)"
            )
        if self.sbom_default and not self.sbom_allowed:
            raise ValueError("BUILDQ_SBOM_DEFAULT=true needs BUILDQ_SBOM_ALLOWED=true")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values, then the environment given to :func:`load_settings`; no dotenv, no files."""
        return init_settings, _MappingEnvSource(settings_cls, _ENVIRON.get())

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("BUILDQ_DEFAULT_TIMEOUT_S must not exceed BUILDQ_MAX_TIMEOUT_S")
        needed = self.max_timeout_s + self.retry_backoff_cap_s
        if self.visibility_timeout_s <= needed:
            raise ValueError(
                f"BUILDQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be greater than "
                f"BUILDQ_MAX_TIMEOUT_S + BUILDQ_RETRY_BACKOFF_CAP_S ({needed:g}): otherwise Redis "
                "redelivers a running build to a second worker"
            )
        return self

    @model_validator(mode="after")
    def _check_sentinel(self) -> Settings:
        urls = {"BROKER_URL": self.broker_url, "RESULT_BACKEND": self.result_backend}
        urls["REDIS_URL"] = self.redis_url or ""
        for name, url in urls.items():
            if url.startswith("sentinel://") and not self.sentinel_master:
                raise ValueError(f"BUILDQ_SENTINEL_MASTER is required with a sentinel:// BUILDQ_{name}")
        return self

    @property
    def daemons(self) -> list[str]:
        """The BuildKit daemon addresses builds are spread over."""
        return list(self.buildkit_hosts) or [self.buildkit_host]

    @model_validator(mode="after")
    def _check_broker(self) -> Settings:
        # a job's message, its claim and its requeue are written together by one script: the
        # broker's queues and buildq's keys must live in one Redis DB
        if not is_redis_url(self.broker_url):
            raise ValueError(
                "BUILDQ_BROKER_URL must be a Redis URL (redis://, rediss://, unix:// or sentinel://): "
                "buildq keeps its job state beside the broker's queues"
            )
        if self.redis_url and not same_redis(self.redis_url, self.broker_url):
            raise ValueError(
                "BUILDQ_REDIS_URL must name the broker's Redis and DB (BUILDQ_BROKER_URL): a job's "
                "message and its state are written together; leave it unset to use the broker"
            )
        return self

    @property
    def state_redis_url(self) -> str:
        """The Redis URL for buildq's keys: the broker's (or ``BUILDQ_REDIS_URL``, the same Redis)."""
        return self.redis_url or self.broker_url

    @property
    def deployment_id(self) -> str:
        """``BUILDQ_DEPLOYMENT``, else a name derived from the state Redis (host, port, DB; no password)."""
        return self.deployment or derived_deployment(self.state_redis_url, self.sentinel_master)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None) -> None:
        self._environ = os.environ if environ is None else environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _env_name(loc: tuple[object, ...]) -> str:
    return ENV_PREFIX + str(loc[0]).upper()


def closest_name(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate ``name`` was most likely meant to be (compared without the ``BUILDQ_``
    prefix, which every candidate shares), None when none is close."""
    bare = {c.removeprefix(ENV_PREFIX): c for c in candidates}
    found = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), list(bare), n=1, cutoff=0.6)
    return bare[found[0]] if found else None


def unknown_settings_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    """One line naming each unknown ``BUILDQ_*`` variable, with the closest known name when one is
    close (a setting, or one of the compose stack's variables, which are not settings)."""
    named = []
    for name in unknown:
        closest = closest_name(name, [*known, *STACK_VARIABLES])
        if closest in STACK_VARIABLES:
            named.append(f"{name} (did you mean {closest}? a variable of the compose stack, not a setting)")
        else:
            named.append(f"{name} (did you mean {closest}?)" if closest else name)
    what = "unknown setting" if len(unknown) == 1 else "unknown settings"
    return f"{what}: " + ", ".join(named) + "; the settings are listed in docs/settings.md"


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build the settings from ``environ`` (default ``os.environ``) plus explicit overrides.

    Raises :class:`SettingsError` naming every bad or unknown ``BUILDQ_*`` variable.
    """
    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    ours = [k for k in env if k.startswith(ENV_PREFIX) and not k.startswith(NOT_SETTINGS_PREFIXES)]
    unknown = sorted(k for k in ours if k not in known)
    if unknown:
        raise SettingsError(unknown_settings_message(unknown, sorted(known)))
    env = {k: v for k, v in env.items() if not k.startswith(NOT_SETTINGS_PREFIXES)}
    token = _ENVIRON.set(env)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            problems.append(f"{_env_name(loc)}: {msg}" if loc else msg)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from exc
    finally:
        _ENVIRON.reset(token)
