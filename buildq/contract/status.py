"""What a reader gets for a job in any state, pure and light (the standard library only): the
CLI's read paths (``buildq status``) import this without pydantic (:mod:`buildq.contract.record`
re-exports it)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def job_id_time(job_id: str) -> float | None:
    """When a job id made by :func:`~buildq.contract.job.new_job_id` was made (epoch s); None for any
    other id."""
    if len(job_id) != 32 or not all(c in "0123456789abcdef" for c in job_id):
        return None
    seconds = int(job_id[:12], 16) / 1000
    return seconds if 1_500_000_000 < seconds < time.time() + 86400 else None


def iso(ts: float | None) -> str | None:
    """Epoch seconds → RFC 3339 UTC with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(text: str | None) -> float | None:
    """RFC 3339 (as :func:`iso` writes it) → epoch seconds."""
    return datetime.fromisoformat(text).timestamp() if text else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _common(
    job_id: str, state: str, phase: str | None, attempt: int | None, worker: str | None,
    daemon: str | None, retry_of: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "job_id": job_id,
        "retry_of": retry_of or None,
        "state": state,
        "phase": phase,
        "attempt": attempt,
        "worker": worker or None,
        "daemon": daemon or None,
    }


#: fields of a stored attempt that only older workers wrote (internal; never shown)
_INTERNAL_ATTEMPT_FIELDS = ("window_end",)


def public_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored final record in the documented shape (records of older workers brought up to it)."""
    attempts = [
        {k: v for k, v in a.items() if k not in _INTERNAL_ATTEMPT_FIELDS}
        for a in record.get("attempts") or []
    ]
    last = attempts[-1] if attempts else {}
    common = _common(
        str(record["job_id"]), str(record["state"]), "done", len(attempts) or None, record.get("worker"),
        record.get("daemon", last.get("daemon")), record.get("retry_of"),
    )  # fmt: skip
    rest = {k: v for k, v in record.items() if k not in common}
    return {**common, "routing": None, "explain": None, "superseded_by": None, **rest, "attempts": attempts}


_PENDING_STATES = ("queued", "running")


#: a job id made this long before the Redis epoch is lost, not merely unknown (clock slack)
LOST_SLACK_S = 5.0


def job_status(
    job_id: str, info: Mapping[str, str], record: Mapping[str, Any] | None, epoch: float | None = None
) -> dict[str, Any]:
    """What a reader gets for ``job_id`` in any state: the stored record once finished, else the job
    hash (``buildq:job:<id>``, all strings) in the same shape: ``attempt`` a number, times ISO
    strings, and none of the hash's internal fields (message, history, claim generation, queue).
    A job buildq has nothing about is ``unknown``, or ``lost`` when its id (one the client made)
    dates from before ``epoch``, when the Redis asked began holding buildq's data."""
    if record is not None:
        return public_record(record)
    state = info.get("state")
    if state not in _PENDING_STATES:  # never seen (or its hash expired)
        made = job_id_time(job_id)
        lost = epoch is not None and made is not None and made < epoch - LOST_SLACK_S
        empty = {"enqueued_at": iso(made) if lost else None, "started_at": None}
        return {**_common(job_id, "lost" if lost else "unknown", None, None, None, None), **empty}
    attempt = info.get("attempt")
    phase = info.get("phase") or ("queued" if state == "queued" else None)
    return {
        **_common(
            job_id,
            state,
            phase,
            int(attempt) if attempt and attempt.isdigit() else None,
            info.get("worker"),
            info.get("daemon"),
            info.get("retry_of"),
        ),  # fmt: skip
        "enqueued_at": iso(_float(info.get("enqueued_at"))),
        "started_at": iso(_float(info.get("started_at"))),
    }


def seconds_text(value: float) -> str:
    """``31.2``, ``0.4``, ``0`` — and milliseconds below a tenth (``0.017``)."""
    if value == 0:
        return "0"
    return f"{value:.3f}" if value < 0.1 else f"{value:.1f}"


def sentence(flag: Mapping[str, Any]) -> str:
    """``cache_import 31.2 s, 78× its median of 0.4 s over the last 50 builds``."""
    what = f'step "{flag["step"]}"' if flag["phase"] == "step" else flag["phase"]
    seconds, median, ratio = flag["seconds"], flag["median"], flag["ratio"]
    over = f"over the last {flag['builds']} builds"
    if ratio is None:
        return f"{what} {seconds_text(seconds)} s against a median of 0 s {over}"
    times = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
    return f"{what} {seconds_text(seconds)} s, {times}× its median of {seconds_text(median)} s {over}"
