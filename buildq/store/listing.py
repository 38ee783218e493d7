"""``buildq list``: the recent jobs (from the state indexes) and the depth of each queue.

:func:`job_row` is pure (one job's hash fields and record → a row). :func:`recent_jobs` reads the
ids of the wanted states' bands of the index only, newest first (:func:`~buildq.store.keys.state_band`),
then one ``HMGET`` per job: ``--state failed`` over ten thousand recent jobs reads the failed ones,
not the ten thousand. :class:`JobFilter` (``--repo``, ``--tag``, ``--worker``) is pure too; the
bands are read a page at a time until enough rows pass it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import redis

from ..contract.record import iso
from ..contract.reference import parse_reference
from .keys import BAND, FINAL_STATES, JOBS_INDEX, job_key, state_band

_FIELDS = ("state", "phase", "enqueued_at", "started_at", "retry_of", "job", "worker", "daemon")
_BATCH = 100


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _body_tags(body: str | None) -> list[str]:
    try:
        tags = json.loads(body).get("tags") if body else None
    except (ValueError, AttributeError):
        return []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def job_row(
    job_id: str, fields: dict[str, str | None], record: dict[str, Any] | None
) -> dict[str, Any] | None:
    """One row of ``buildq list``: ``job_id``, ``state``, ``phase``, ``enqueued_at`` (RFC 3339),
    ``duration_s``, ``image`` (first tag, and ``@digest`` once built), ``tags`` (all of the job's),
    ``worker`` and ``daemon`` (of the current or last attempt), ``retry_of``. None when the job's
    hash and record are both gone (expired)."""
    if record is None and not fields.get("state"):
        return None
    image = None
    duration = None
    tags = _body_tags(fields.get("job"))
    if record is not None:
        duration = record.get("duration_s")
        names = (record.get("image") or {}).get("names") or tags or [None]
        digest = (record.get("image") or {}).get("digest")
        image = f"{names[0]}@{digest}" if names[0] and digest else names[0]
        tags = [n for n in names if n] or tags
    elif tags:
        image = tags[0]
    state = (record or {}).get("state") or fields.get("state")
    return {
        "job_id": job_id,
        "state": state,
        "phase": (record or {}).get("phase")
        or fields.get("phase")
        or ("queued" if state == "queued" else None),
        "enqueued_at": iso(_float(fields.get("enqueued_at"))),
        "duration_s": duration,
        "image": image,
        "tags": tags,
        "worker": (record or {}).get("worker") or fields.get("worker") or None,
        "daemon": (record or {}).get("daemon") or fields.get("daemon") or None,
        "retry_of": (record or {}).get("retry_of") or fields.get("retry_of") or None,
    }


def _repository(tag: str) -> str | None:
    try:
        return parse_reference(tag).repository
    except ValueError:
        return None


@dataclass(frozen=True)
class JobFilter:
    """Which rows ``buildq list`` keeps: every kind given must match (any of its patterns, shell
    style: ``registry:5000/team/*``). ``repos``: a tag's repository (the tag without ``:tag``);
    ``tags``: a whole tag; ``workers``: the worker of the current or last attempt, as ``host:pid``
    or its ``host``."""

    repos: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()

    def __call__(self, row: dict[str, Any]) -> bool:
        tags = [t for t in row.get("tags") or () if isinstance(t, str)]
        if self.tags and not any(fnmatchcase(t, p) for t in tags for p in self.tags):
            return False
        if self.repos:
            repos = [r for r in (_repository(t) for t in tags) if r]
            if not any(fnmatchcase(r, p) for r in repos for p in self.repos):
                return False
        if self.workers:
            worker = str(row.get("worker") or "")
            names = (worker, worker.rsplit(":", 1)[0]) if worker else ()
            if not any(fnmatchcase(n, p) for n in names for p in self.workers):
                return False
        return True


def _ids(client: redis.Redis, state: str, start: int, n: int, since: float | None) -> list[tuple[float, str]]:
    """Up to ``n`` (enqueued_at, job id) of the jobs indexed under ``state`` (enqueued at ``since``
    or later), newest first, skipping the first ``start``."""
    low, high = state_band(state)
    if state == "running":  # scored -enqueued_at: the newest is the lowest
        top = f"({high}" if since is None else repr(-since)
        got = client.zrangebyscore(JOBS_INDEX, low, top, start=start, num=n, withscores=True)
    else:
        bottom = low if since is None else repr(low + since)
        got = client.zrevrangebyscore(JOBS_INDEX, f"({high}", bottom, start=start, num=n, withscores=True)
    pairs: list[tuple[Any, Any]] = list(got)  # type: ignore[arg-type]
    return [(abs(float(s)) % BAND, m.decode() if isinstance(m, bytes) else str(m)) for m, s in pairs]


def recent_jobs(
    client: redis.Redis,
    *,
    limit: int,
    states: Iterable[str] = (),
    since: float | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit`` rows, newest first, of jobs in one of ``states`` (any when empty) enqueued
    at ``since`` (epoch s) or later, that ``keep`` keeps (e.g. a :class:`JobFilter`).

    Reads only the wanted states' bands, a page of each at a time, merged newest first: a row is
    taken once no band not yet read to its end can hold a newer one."""
    wanted = set(states) or {"queued", "running", *FINAL_STATES}
    cursors = dict.fromkeys(sorted(wanted), 0)
    floors: dict[str, float] = {}
    pending: list[tuple[float, str]] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < limit and (cursors or pending):
        for state in list(cursors):
            page = _ids(client, state, cursors[state], _BATCH, since)
            pending.extend(page)
            cursors[state] += len(page)
            if len(page) < _BATCH:
                del cursors[state]
                floors.pop(state, None)
            else:
                floors[state] = page[-1][0]
        bound = max(floors.values()) if cursors else float("-inf")
        pending.sort(reverse=True)
        cut = next((i for i, (at, _) in enumerate(pending) if at < bound), len(pending))
        ready, pending = pending[:cut], pending[cut:]
        batch = [job_id for _, job_id in ready if job_id not in seen]
        seen.update(batch)
        for start in range(0, len(batch), _BATCH):
            for row in _rows(client, batch[start : start + _BATCH]):
                if row["state"] in wanted and (keep is None or keep(row)):
                    rows.append(row)
                    if len(rows) == limit:
                        return rows
    return rows


def _rows(client: redis.Redis, ids: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The rows of these jobs (one ``HMGET`` each, in one pipeline), expired ones left out."""
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(job_key(job_id), [*_FIELDS, "record"])
    for job_id, values in zip(ids, pipe.execute(), strict=True):
        fields = {name: (v.decode() if v else None) for name, v in zip(_FIELDS, values, strict=False)}
        raw = values[-1]
        row = job_row(job_id, fields, json.loads(raw) if raw else None)
        if row is not None:
            yield row


def queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue (LLEN; Celery's Redis transport keeps a queue in a list)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}
