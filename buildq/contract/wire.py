"""The message on the queue: Celery message protocol v2 on the Redis transport (pure).

This is the whole wire contract for a producer in another language (docs/api.md "Producers in other
languages"): ``LPUSH <queue> <message>`` where ``message`` is the JSON :func:`build_message` makes
and its ``body`` is base64 of ``[[], {"job": <job per buildq schema>, "delivery": <id>}, {...}]``.

The message carries the job and a delivery id, nothing else a worker believes: attempts, waits,
ages and times are written by the workers themselves into Redis. A producer may leave ``delivery``
out (the job's first message then counts as its delivery); older fields (``enqueued_at``,
``attempts``, ``window_start``, ``waiting_since``) are read past and never believed.
:func:`read_delivery` is what a worker makes of any message: the job as sent, a checked delivery id,
or the first problem with the message, named by its field.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..names import TASK_NAME

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: a delivery id: what the client and the workers write (32 hex digits); a producer may use any
#: id of letters, digits, ``-`` and ``_`` up to 64 characters
DELIVERY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: message fields of older producers and workers: read past, never believed
LEGACY_FIELDS = frozenset({"enqueued_at", "attempts", "window_start", "waiting_since"})


def new_delivery() -> str:
    """A fresh delivery id."""
    return uuid.uuid4().hex


def job_kwargsrepr(job: Any) -> str:
    """What Flower and the worker log show as a build's arguments: the job id and tags, never the
    whole job (build args, labels, a URL context's query string). ``job`` as sent (dict or JSON)."""
    if isinstance(job, str):
        try:
            job = json.loads(job)
        except ValueError:
            job = None
    if not isinstance(job, dict):
        return "{'job': '?'}"
    tags = job.get("tags")
    tags = [t for t in tags if isinstance(t, str)] if isinstance(tags, list | tuple) else []
    return f"{{'job': {job.get('job_id')!r}, 'tags': {tags!r}}}"


def build_message(
    job_id: str,
    queue: str,
    job: dict[str, Any],
    *,
    delivery: str,
    delivery_tag: str | None = None,
    eta: float | None = None,
    retries: int = 0,
) -> bytes:
    """The Redis-transport message of one ``buildq.build`` task (protocol v2, JSON body); ``eta``
    (epoch seconds) makes the worker that receives it hold it until then (a retry's countdown)."""
    kwargs = {"job": job, "delivery": delivery}
    body = json.dumps([[], kwargs, _EMBED], separators=(",", ":")).encode()
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": job_id,
            "shadow": None,
            "eta": datetime.fromtimestamp(eta, UTC).isoformat() if eta is not None else None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": job_kwargsrepr(job),
            "origin": f"{os.getpid()}@{socket.gethostname()}",
            "ignore_result": None,  # the worker decides (BUILDQ_TASK_RESULTS)
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag or uuid.uuid4().hex,
        },
    }
    return json.dumps(message, separators=(",", ":")).encode()


def next_message(
    job_id: str, queue: str, job: dict[str, Any], *, eta: float | None = None, retries: int = 0
) -> tuple[bytes, str, str]:
    """A job's next message (a retry, a wait for a daemon) with a fresh delivery id and delivery tag:
    (message, delivery id, delivery tag)."""
    delivery, tag = new_delivery(), new_delivery()
    message = build_message(job_id, queue, job, delivery=delivery, delivery_tag=tag, eta=eta, retries=retries)
    return message, delivery, tag


@dataclass(frozen=True)
class Delivery:
    """One delivered message as a worker reads it: the job as sent (not yet validated), the
    delivery id ('' when the producer sent none), the Celery task id, the queue it came from and
    how often Celery re-sent it. ``problem`` is (field, message) of the first thing wrong with the
    message itself; the job's own fields are checked by :func:`buildq.contract.job.parse_job`."""

    job: Any
    delivery: str
    task_id: str | None
    queue: str | None
    retries: int = 0
    problem: tuple[str, str] | None = None


def read_delivery(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    task_id: str | None,
    queue: str | None,
    retries: int | None = None,
) -> Delivery:
    """What a worker makes of a message's positional and keyword arguments (never raises)."""
    job = kwargs.get("job", args[0] if args else None)
    delivery = kwargs.get("delivery", "")
    problem = None
    unknown = sorted(set(kwargs) - {"job", "delivery"} - LEGACY_FIELDS)
    if delivery is None:
        delivery = ""
    if not isinstance(delivery, str) or (delivery and not DELIVERY_PATTERN.match(delivery)):
        problem = ("delivery", "delivery: expected an id of letters, digits, - and _ (at most 64)")
        delivery = ""
    elif len(args) > 1 or (args and "job" in kwargs):
        problem = ("job", "a build message carries one job (keyword argument 'job')")
    elif unknown:
        problem = (unknown[0], f"unknown message field {unknown[0]!r}")
    count = retries if isinstance(retries, int) and retries >= 0 else 0
    return Delivery(job, delivery, task_id if isinstance(task_id, str) else None, queue, count, problem)
