"""Checks of a job that only the worker can make (its filesystem, its limits, its environment,
what its operator granted).

They run before anything is claimed or launched; a failing check raises
:class:`~buildq.errors.InvalidJobError` naming the field, and the job is rejected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ..config import Settings
from ..contract.grants import check_repositories, check_secrets, context_outside_roots
from ..contract.job import BuildJob
from ..errors import InvalidJobError


def check_job_on_worker(
    job: BuildJob,
    *,
    environ: Mapping[str, str],
    max_timeout_s: int,
    secret_env: Sequence[str],
    context_roots: Sequence[str],
    real_context_roots: Sequence[str],
    allowed_repositories: Sequence[str],
) -> None:
    """Checks only the worker can make; raise InvalidJobError naming the field.

    The grants come first, so a refused job learns nothing of the worker's files or variables.
    ``real_context_roots`` are ``context_roots`` with symlinks resolved (once, at the worker's start).
    """
    check_secrets(job, secret_env)
    check_repositories(job, allowed_repositories)
    if not job.is_remote:  # BuildKit fetches a git or archive URL itself; context roots are for directories
        real_context = os.path.realpath(job.context)
        refused = context_outside_roots(job.context, real_context, context_roots, real_context_roots)
        if refused is not None:
            raise InvalidJobError(refused, field="context")
        if not os.path.isdir(job.context):
            raise InvalidJobError(
                f"context: {job.context!r} is not a directory on the worker "
                "(from another machine: buildq submit --upload)",
                field="context",
            )
        if not os.access(job.context, os.R_OK | os.X_OK):
            raise InvalidJobError(f"context: {job.context!r} is not readable by the worker", field="context")
        dockerfile = os.path.join(job.context, job.dockerfile)
        if not os.path.isfile(dockerfile):
            raise InvalidJobError(
                f"dockerfile: {job.dockerfile!r} not found in the context", field="dockerfile"
            )
        if os.path.commonpath([real_context, os.path.realpath(dockerfile)]) != real_context:
            raise InvalidJobError("dockerfile: resolves outside the context", field="dockerfile")
    if job.timeout_s is not None and job.timeout_s > max_timeout_s:
        raise InvalidJobError(
            f"timeout_s: {job.timeout_s} exceeds the worker's maximum {max_timeout_s} (BUILDQ_MAX_TIMEOUT_S)",
            field="timeout_s",
        )
    for index, secret in enumerate(job.secrets):
        if secret.env not in environ:
            raise InvalidJobError(
                f"secrets[{index}].env: environment variable {secret.env!r} is not set on the worker",
                field=f"secrets[{index}].env",
            )


class WorkerChecks:
    """:func:`check_job_on_worker` with this worker's settings (context roots resolved once)."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings, self.environ = settings, environ
        self.real_context_roots = [os.path.realpath(root) for root in settings.context_roots]

    def __call__(self, job: BuildJob) -> None:
        check_job_on_worker(
            job,
            environ=self.environ,
            max_timeout_s=self.settings.max_timeout_s,
            secret_env=self.settings.secret_env,
            context_roots=self.settings.context_roots,
            real_context_roots=self.real_context_roots,
            allowed_repositories=self.settings.allowed_repositories,
        )
