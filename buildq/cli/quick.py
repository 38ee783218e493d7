"""The read path that starts fast: ``buildq status JOB [--json]`` without typer, pydantic or
redis-py (their imports alone cost more than the whole command may). :func:`run` answers it when
it can: the same ``BUILDQ_*`` variables as a run of the full command line validated before (it
leaves a mark, :func:`remember_valid`), a plain ``redis://`` URL, Redis answering at once, the job
in Redis. Anything else (new or changed settings, Sentinel, TLS, Redis away, a job only in the
archive, another command) returns None and the full command line runs, with its validation, its
patience and its errors: a bad setting is always refused. :func:`show_status` is what both paths
print.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: every setting's variable; ``tests/test_cli_quick.py`` holds it equal to the Settings' fields
KNOWN_SETTINGS = frozenset(
    "BUILDQ_" + name.upper()
    for name in """
    broker_url result_backend redis_url launcher buildkit_host buildkit_hosts
    buildkit_max_builds buildctl_image buildctl_path local_state_dir insecure_registries
    docker_url docker_network docker_pull_timeout_s queue high_priority_queue default_timeout_s
    max_timeout_s retry_max_attempts retry_backoff_base_s retry_backoff_cap_s transient_patterns
    lease_ttl_s visibility_timeout_s event_batch_s shutdown_grace_s result_ttl_s requeue_lost_after_s
    metrics_port metrics_dir log_format redact_env log_stream_maxlen log_stream_ttl_s
    log_max_bytes archive_dir log_archived_ttl_s archived_record_ttl_s task_results
    daemon_wait_s registry_wait_s daemon_hold_s redis_retry_s redis_persistence deployment
    secret_env context_roots allowed_repositories git_transports context_repository
    context_max_bytes cache_affinity affinity_wait_s cache_default_scope cache_export_wait_s
    baseline_n docker_warm sentinel_master sentinel_password submit_replicas
    replica_wait_timeout_s provenance_default provenance_allowed sbom_default sbom_allowed
    sbom_scanner_image registry_read_timeout_s
    """.split()
)
NOT_SETTINGS_PREFIXES = ("BUILDQ_STACK_", "BUILDQ_TEST_")


def run(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int | None:
    """The exit code of ``buildq <argv>`` answered here, or None to take the full path."""
    env = os.environ if environ is None else environ
    job_id, as_json = _status_args(argv)
    if job_id is None or not _settings_known(env) or not _validated(env):
        return None
    from ..store.resp import ReplyError, open_url

    try:
        conn = open_url(
            env.get("BUILDQ_REDIS_URL") or env.get("BUILDQ_BROKER_URL") or "redis://127.0.0.1:6379/0"
        )
    except (OSError, ReplyError, ValueError):
        return None
    if conn is None:
        return None
    from ..store.keys import EPOCH, job_key

    try:
        fields, epoch = conn.pipeline(("HGETALL", job_key(job_id)), ("GET", EPOCH))
    except OSError:
        return None
    finally:
        conn.close()
    if isinstance(fields, ReplyError) or isinstance(epoch, ReplyError):
        return None
    info = {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}
    raw = info.pop("record", None)
    if raw is None and not info and env.get("BUILDQ_ARCHIVE_DIR"):
        return None  # maybe in the archive: the full path reads it
    from ..contract.status import _float, job_status

    record = job_status(
        job_id, info, json.loads(raw) if raw else None, _float(epoch.decode() if epoch else None)
    )
    return show_status(job_id, record, as_json)


def _status_args(argv: Sequence[str]) -> tuple[str | None, bool]:
    """(job id, --json) when ``argv`` is ``status JOB`` with at most ``--json``; (None, False) else."""
    if len(argv) < 2 or argv[0] != "status":
        return None, False
    rest = list(argv[1:])
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    if len(rest) != 1 or rest[0].startswith("-") or len(argv) > 3:
        return None, False
    return rest[0], as_json


def _settings_known(env: Mapping[str, str]) -> bool:
    return all(
        k in KNOWN_SETTINGS
        for k in env
        if k.startswith("BUILDQ_") and not k.startswith(NOT_SETTINGS_PREFIXES)
    )


def _marks(env: Mapping[str, str]) -> Path | None:
    """The folder of the marks of validated settings (the user's cache folder)."""
    base = env.get("XDG_CACHE_HOME") or (str(Path(env["HOME"]) / ".cache") if env.get("HOME") else None)
    return Path(base) / "buildq" / "settings-ok" if base else None


def _mark_name(env: Mapping[str, str]) -> str:
    """A digest of every ``BUILDQ_*`` setting and its value (nothing readable is kept)."""
    ours = sorted(
        (k, v) for k, v in env.items() if k.startswith("BUILDQ_") and not k.startswith(NOT_SETTINGS_PREFIXES)
    )
    return hashlib.sha256("\0".join(f"{k}={v}" for k, v in ours).encode()).hexdigest()


def _validated(env: Mapping[str, str]) -> bool:
    folder = _marks(env)
    return folder is not None and (folder / _mark_name(env)).is_file()


def remember_valid(environ: Mapping[str, str] | None = None) -> None:
    """Mark these settings as validated by the full path (best effort: no mark, no quick path)."""
    env = os.environ if environ is None else environ
    folder = _marks(env)
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / _mark_name(env), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
    except OSError:
        pass


def show_status(job_id: str, record: dict[str, Any], as_json: bool) -> int:
    """Print a job's status as ``buildq status`` does; its exit code (0; 1 for a failed, cancelled,
    unknown or lost job)."""
    state = record.get("state")
    if state in ("unknown", "lost"):
        if as_json:
            print(json.dumps(record))
        if state == "lost":
            print(
                f"buildq: job {job_id!r} was submitted at {record.get('enqueued_at')}, before this Redis's "
                "buildq data began: it is lost (Redis restarted without its data? "
                "see BUILDQ_REDIS_PERSISTENCE)",
                file=sys.stderr,
            )
        else:
            print(f"buildq: unknown job {job_id!r}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        from .views import render_record

        render_record(record)
    return 1 if state in ("failed", "cancelled") else 0
