"""What the operator grants producers: secrets, local contexts, push destinations (pure).

A job may only name what the worker's settings grant, so a producer cannot carry a worker's
credentials out in an image layer, build from any directory the worker can read, or push over
another team's tags and build cache:

- ``BUILDQ_SECRET_ENV``: shell-style patterns (:func:`fnmatch.fnmatchcase`) of the worker variables
  a job may name as secrets. None: no job may use secrets. ``BUILDQ_*`` variables (the worker's
  own settings, the broker URL with its password among them) are never granted, in any case.
- ``BUILDQ_CONTEXT_ROOTS``: a local context must lie under one of these directories, both as written
  and after resolving symlinks (:func:`context_outside_roots`). None: any directory.
- ``BUILDQ_GIT_TRANSPORTS``: the schemes a git context may use (``ssh`` only when listed: BuildKit
  fetches it with the daemon host's ssh keys).
- ``BUILDQ_ALLOWED_REPOSITORIES``: repository patterns every tag and the ``cache_ref`` must match
  (:func:`repository_matches`). None: any repository.

Every check raises :class:`~buildq.errors.InvalidJobError` naming the field. The functions take the
settings' values and the job, nothing else (the context check takes the resolved paths, or a
``realpath`` to resolve them with).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import InvalidJobError
from .reference import parse_reference

if TYPE_CHECKING:
    from .job import BuildJob

#: worker variables no pattern grants: the worker's own settings
NEVER_GRANTED_PREFIX = "BUILDQ_"
DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


# -- secrets ---------------------------------------------------------------------------------------


def never_granted(name: str) -> bool:
    """True for the worker's own settings: ``BUILDQ_*`` in any case (settings are read
    case-insensitively, so ``buildq_broker_url`` is one too)."""
    return name.upper().startswith(NEVER_GRANTED_PREFIX)


def secret_granted(name: str, patterns: Sequence[str]) -> bool:
    """True when the worker variable ``name`` matches a pattern of ``BUILDQ_SECRET_ENV``."""
    if never_granted(name):
        return False
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def granted_values(environ: Mapping[str, str], patterns: Sequence[str]) -> list[str]:
    """The values of every worker variable a job may name as a secret (all of them are redacted)."""
    if not patterns:
        return []
    return [value for name, value in environ.items() if value and secret_granted(name, patterns)]


def check_secrets(job: BuildJob, patterns: Sequence[str]) -> None:
    """Every secret's ``env`` must be granted by ``BUILDQ_SECRET_ENV``."""
    for index, secret in enumerate(job.secrets):
        if secret_granted(secret.env, patterns):
            continue
        field = f"secrets[{index}].env"
        if not patterns:
            why = "no variable is granted to jobs (BUILDQ_SECRET_ENV is not set)"
        elif never_granted(secret.env):
            why = f"{NEVER_GRANTED_PREFIX}* variables are never granted to jobs"
        else:
            why = "it is not granted to jobs (BUILDQ_SECRET_ENV)"
        message = f"{field}: environment variable {secret.env!r} may not be used: {why}"
        raise InvalidJobError(message, field=field)


# -- repositories ----------------------------------------------------------------------------------


def normalize_repository(repository: str) -> str:
    """``repository`` with Docker Hub spelled out: ``app`` → ``docker.io/library/app``,
    ``team/app`` → ``docker.io/team/app``, ``index.docker.io/team/app`` → ``docker.io/team/app``.

    Works on patterns too (a ``*`` in the first component does not make it a registry host).
    """
    first, sep, rest = repository.partition("/")
    is_host = bool(sep) and ("." in first or ":" in first or first == "localhost" or first != first.lower())
    if is_host and first not in _DOCKER_HUB_ALIASES:
        return repository
    path = rest if is_host else repository
    if "/" not in path:
        path = f"library/{path}"
    return f"{DOCKER_HUB}/{path}"


@lru_cache(maxsize=256)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    norm = normalize_repository(pattern)
    subtree = norm.endswith("/*")
    body = norm[:-2] if subtree else norm
    regex = "[^/]*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("/.+" if subtree else "") + r"\Z")


def validate_repository_pattern(pattern: str) -> str:
    """``pattern`` if it is a repository name in which ``*`` may stand for characters; else ValueError."""
    if not pattern or pattern != pattern.strip():
        raise ValueError(f"{pattern!r} is not a repository pattern")
    try:
        ref = parse_reference(pattern.replace("*", "x"))
    except ValueError:
        ref = None
    if ref is None or ref.tag or ref.digest:
        raise ValueError(
            f"{pattern!r} is not a repository pattern (expected [registry[:port]/]path, where * stands "
            "for any characters but '/' and a final /* for everything below; no tag)"
        )
    return pattern


def repository_matches(repository: str, pattern: str) -> bool:
    """Does the repository (no tag) match ``pattern``?

    Both are normalised (:func:`normalize_repository`). ``*`` stands for any characters except
    ``/``; a pattern ending in ``/*`` matches every repository below that prefix, at any depth.
    ``registry:5000/team-a/*`` matches ``registry:5000/team-a/app`` and
    ``registry:5000/team-a/sub/app``, not ``registry:5000/team-a`` nor ``registry:5000/team-ab/app``;
    ``registry:5000/team-a/app`` matches only itself.
    """
    return _pattern_regex(pattern).match(normalize_repository(repository)) is not None


def repository_of(reference: str) -> str:
    """The repository of a validated, digest-free image reference (its tag dropped)."""
    name, sep, tag = reference.rpartition(":")
    return name if sep and "/" not in tag else reference


@lru_cache(maxsize=1024)
def repository_allowed(repository: str, patterns: tuple[str, ...]) -> bool:
    """True when ``repository`` matches one of ``patterns`` (cached: the same names come back)."""
    return any(repository_matches(repository, pattern) for pattern in patterns)


def check_repository(reference: str, patterns: Sequence[str], field: str) -> None:
    """The repository of image reference ``reference`` must match one of ``patterns`` (if any)."""
    if not patterns:
        return
    repository = repository_of(reference)
    if repository_allowed(repository, tuple(patterns)):
        return
    raise InvalidJobError(
        f"{field}: repository {repository!r} is not one this deployment may push to "
        f"(BUILDQ_ALLOWED_REPOSITORIES: {', '.join(patterns)})",
        field=field,
    )


def check_repositories(job: BuildJob, patterns: Sequence[str]) -> None:
    """Every tag and the cache ref must be in an allowed repository (unset: all are)."""
    if not patterns:
        return
    for index, tag in enumerate(job.tags):
        check_repository(tag, patterns, f"tags[{index}]")
    if job.cache_ref is not None:
        check_repository(job.cache_ref, patterns, "cache_ref")


# -- git transports --------------------------------------------------------------------------------


def check_git_transport(context: str, transports: Sequence[str]) -> None:
    """A git context's scheme (``https``, ``git``, ``ssh``) must be one ``BUILDQ_GIT_TRANSPORTS`` lists."""
    scheme = context.partition("://")[0].lower()
    if scheme in transports:
        return
    raise InvalidJobError(
        f"context: {scheme}:// git contexts are not granted to jobs (BUILDQ_GIT_TRANSPORTS: "
        f"{', '.join(transports) or 'none'}; ssh:// would use the daemon host's ssh keys)",
        field="context",
    )


# -- local contexts --------------------------------------------------------------------------------


def is_under(path: str, roots: Iterable[str]) -> bool:
    """True when the absolute, normalised ``path`` is one of ``roots`` or lies below one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


#: the kernel's pseudo-filesystems: never a context or a Dockerfile's folder (``/proc/self/environ`` is
#: the worker's whole environment), nor a folder holding one (``/``), whatever the roots say
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def pseudo_filesystem(path: str) -> str | None:
    """The pseudo-filesystem the absolute, normalised ``path`` lies in or contains, else None."""
    for root in PSEUDO_FILESYSTEMS:
        if is_under(path, [root]) or is_under(root, [path]):
            return root
    return None


def check_not_pseudo(field: str, value: str, *paths: str) -> None:
    """None of ``paths`` (``value`` as written, then as resolved) may be or hold a pseudo-filesystem."""
    for path in paths:
        root = pseudo_filesystem(path)
        if root is not None:
            raise InvalidJobError(
                f"{field}: {value!r} is or holds {root}, a pseudo-filesystem jobs may never build from",
                field=field,
            )


def context_outside_roots(
    context: str, real_context: str, roots: Sequence[str], real_roots: Sequence[str]
) -> str | None:
    """Why ``context`` is refused (None: it is fine). ``real_*`` are the paths with symlinks resolved.

    The context must lie under a root as written *and* after resolving symlinks: a symlink under a
    root that points elsewhere is refused, and so is a path outside the roots that leads into one.
    """
    if not roots:
        return None
    if not is_under(context, roots):
        return f"context: {context!r} is outside the directories jobs may build from (BUILDQ_CONTEXT_ROOTS)"
    if not is_under(real_context, real_roots):
        return (
            f"context: {context!r} leads through a symlink outside the directories jobs may build "
            "from (BUILDQ_CONTEXT_ROOTS)"
        )
    return None


def check_context_roots(
    context: str, roots: Sequence[str], realpath: Callable[[str], str] = os.path.realpath
) -> None:
    """A local context must lie under ``roots`` (unset: anywhere), resolved with ``realpath``."""
    if not roots:
        return
    why = context_outside_roots(context, realpath(context), roots, [realpath(root) for root in roots])
    if why is not None:
        raise InvalidJobError(why, field="context")


def check_producer_grants(
    job: BuildJob, *, secret_env: Sequence[str], allowed_repositories: Sequence[str]
) -> None:
    """What a producer can check with the worker's settings and no worker filesystem.

    A producer whose ``BUILDQ_SECRET_ENV`` is unset does not know the worker's grants, so it does
    not check secrets; the worker always does.
    """
    if secret_env:
        check_secrets(job, secret_env)
    check_repositories(job, allowed_repositories)
