"""Attestations a build pushes (SLSA provenance, an SPDX SBOM), as the operator allows them (pure).

A job asks with ``provenance`` (``min``, ``max`` or ``none``) and ``sbom`` (true / false); a field
left out takes the operator's default (``BUILDQ_PROVENANCE_DEFAULT``, ``BUILDQ_SBOM_DEFAULT``).
:func:`effective_attestations` gives the job with both filled in, or raises
:class:`~buildq.errors.InvalidJobError` naming the field when the operator forbids what it asks, or
when provenance would publish a secret: BuildKit writes the context's URL into the statement
(``invocation.configSource.uri`` and ``materials``, in ``min`` mode too) and every build arg in
``max`` mode, and a pushed attestation cannot be redacted afterwards (docs/attestations.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import InvalidJobError
from .job import BuildJob, is_git_context, url_query_values

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
