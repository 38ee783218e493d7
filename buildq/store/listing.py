"""``buildq list``: the recent jobs (from the state indexes) and the depth of each queue.

:func:`job_row` is pure (one job's hash fields and record → a row). :func:`recent_jobs` reads the
ids of the wanted states' bands of the index only, newest first (:func:`~buildq.store.keys.state_band`),
then one ``HMGET`` per job: ``--state failed`` over ten thousand recent jobs reads the failed ones,
not the ten thousand.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from .keys import BAND, FINAL_STATES, JOBS_INDEX, job_key, state_band

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


def _ids(client: redis.Redis, state: str, n: int) -> list[tuple[float, str]]:
    """Up to ``n`` (enqueued_at, job id) of the jobs indexed under ``state``, newest first."""
    low, high = state_band(state)
    if state == "running":  # scored -enqueued_at: the newest is the lowest
        got = client.zrangebyscore(JOBS_INDEX, low, f"({high}", start=0, num=n, withscores=True)
    else:
        got = client.zrevrangebyscore(JOBS_INDEX, f"({high}", low, start=0, num=n, withscores=True)
    pairs: list[tuple[Any, Any]] = list(got)  # type: ignore[arg-type]
    return [(abs(float(s)) % BAND, m.decode() if isinstance(m, bytes) else str(m)) for m, s in pairs]


def recent_jobs(client: redis.Redis, *, limit: int, states: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Up to ``limit`` rows, newest first, of jobs in one of ``states`` (any when empty)."""
    wanted = set(states) or {"queued", "running", *FINAL_STATES}
    reach = limit + 20  # a few claimed jobs still wait for a slot (queued), and the like
    ids = sorted((i for state in sorted(wanted) for i in _ids(client, state, reach)), reverse=True)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for start in range(0, len(ids), _BATCH):
        batch = [job_id for _, job_id in ids[start : start + _BATCH] if job_id not in seen]
        seen.update(batch)
        pipe = client.pipeline(transaction=False)
        for job_id in batch:
            pipe.hmget(job_key(job_id), [*_FIELDS, "record"])
        for job_id, values in zip(batch, pipe.execute(), strict=True):
            fields = {name: (v.decode() if v else None) for name, v in zip(_FIELDS, values, strict=False)}
            raw = values[-1]
            row = job_row(job_id, fields, json.loads(raw) if raw else None)
            if row is not None and row["state"] in wanted:
                rows.append(row)
                if len(rows) == limit:
                    return rows
    return rows


def queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue (LLEN; Celery's Redis transport keeps a queue in a list)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}
