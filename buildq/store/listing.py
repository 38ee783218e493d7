"""``buildq list``: the recent jobs (from the ``recent`` index) and the depth of each queue.

:func:`job_row` is pure (one job's hash fields and record → a row); :func:`recent_jobs` reads
batches of ids newest first, two commands per id in one pipeline per batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from .keys import RECENT_INDEX, job_key, result_key

_FIELDS = ("state", "phase", "enqueued_at", "started_at", "retry_of")
_BATCH = 100


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def job_row(
    job_id: str, fields: dict[str, str | None], record: dict[str, Any] | None
) -> dict[str, Any] | None:
    """One row of ``buildq list``: ``job_id``, ``state``, ``phase``, ``enqueued_at`` (epoch),
    ``duration_s`` and ``image`` (first tag, and ``@digest`` once built), ``retry_of``. None when
    the job's hash and record are both gone (expired)."""
    if record is None and not fields.get("state"):
        return None
    image = None
    duration = None
    if record is not None:
        duration = record.get("duration_s")
        names = (record.get("image") or {}).get("names") or [None]
        digest = (record.get("image") or {}).get("digest")
        image = f"{names[0]}@{digest}" if names[0] and digest else names[0]
    state = (record or {}).get("state") or fields.get("state")
    return {
        "job_id": job_id,
        "state": state,
        "phase": (record or {}).get("phase")
        or fields.get("phase")
        or ("queued" if state == "queued" else None),
        "enqueued_at": _float(fields.get("enqueued_at")),
        "duration_s": duration,
        "image": image,
        "retry_of": (record or {}).get("retry_of") or fields.get("retry_of") or None,
    }


def recent_jobs(client: redis.Redis, *, limit: int, states: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Up to ``limit`` rows, newest first, of jobs in one of ``states`` (any when empty)."""
    wanted = set(states)
    rows: list[dict[str, Any]] = []
    start = 0
    while len(rows) < limit:
        ids = [i.decode() for i in client.zrevrange(RECENT_INDEX, start, start + _BATCH - 1)]  # type: ignore[union-attr]
        if not ids:
            break
        start += _BATCH
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(job_key(job_id), _FIELDS)
            pipe.get(result_key(job_id))
        replies = pipe.execute()
        for index, job_id in enumerate(ids):
            values, raw = replies[2 * index], replies[2 * index + 1]
            fields = {name: (v.decode() if v else None) for name, v in zip(_FIELDS, values, strict=True)}
            row = job_row(job_id, fields, json.loads(raw) if raw else None)
            if row is not None and (not wanted or row["state"] in wanted):
                rows.append(row)
                if len(rows) == limit:
                    break
    return rows


def queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue (LLEN; Celery's Redis transport keeps a queue in a list)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}
