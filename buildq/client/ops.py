"""What :class:`~buildq.client.BuildqClient` does beyond enqueueing: upload a context, retry a job.

Client side only (no worker module); pure where it can be (``retry_body``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Settings
from ..contract.job import BuildJob, new_job_id, parse_job
from ..errors import InvalidJobError
from .upload import Uploaded, upload_context


def upload_job(
    settings: Settings, job: BuildJob | dict[str, Any] | str, check: Callable[[BuildJob], None]
) -> tuple[BuildJob, Uploaded]:
    """``job`` with its local ``context`` directory (relative: to the current directory) uploaded
    to ``BUILDQ_CONTEXT_REPOSITORY`` and replaced by the blob's URL. The job is validated and
    ``check``-ed (the producer grants) before anything is packed or sent."""
    data = dict(parse_job(job).to_message() if isinstance(job, BuildJob | str) else job)
    if isinstance(data.get("context"), str) and "://" not in data["context"]:
        data["context"] = os.path.abspath(data["context"])
    local = parse_job(data)
    if local.is_remote:
        raise InvalidJobError("context: upload needs a local directory, not a URL", field="context")
    check(local)  # a job the workers would refuse sends nothing
    if not settings.context_repository:
        raise InvalidJobError(
            "BUILDQ_CONTEXT_REPOSITORY is not set: the registry repository uploaded contexts go to",
            field="BUILDQ_CONTEXT_REPOSITORY",
        )
    uploaded = upload_context(
        local.context,
        repository=settings.context_repository,
        insecure_registries=settings.insecure_registries,
        dockerfile=local.dockerfile,
        max_bytes=settings.context_max_bytes,
    )
    return parse_job({**local.to_message(), "context": uploaded.url}), uploaded


def retry_body(job_id: str, status: Mapping[str, Any], info: Mapping[str, str]) -> dict[str, Any]:
    """The job to submit for ``buildq retry job_id``: the old body with a new ``job_id`` and
    ``retry_of``; ``status`` is the old job's record, ``info`` its hash (``job`` holds the body)."""
    state = status.get("state")
    if state not in ("failed", "cancelled"):
        detail = "is unknown" if state == "unknown" else f"is {state}"
        raise InvalidJobError(
            f"job_id: {job_id!r} {detail}; only a failed or cancelled job is retried", field="job_id"
        )
    body = info.get("job")
    if not body:
        raise InvalidJobError(
            f"job_id: the body of {job_id!r} is not kept (expired, or not submitted by buildq)",
            field="job_id",
        )
    return {**json.loads(body), "job_id": new_job_id(), "retry_of": job_id}
