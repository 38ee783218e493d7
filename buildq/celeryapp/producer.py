"""Enqueueing a build as Celery message protocol v2 on the Redis transport — what any producer sends.

This is the whole wire contract for a producer in another language (see the README's
"Producers"): ``LPUSH <queue> <message>`` where ``message`` is the JSON below and its ``body``
is base64 of ``[[], {"job": <job per buildq schema>, "enqueued_at": <epoch seconds>}, {...}]``.
The Python client uses it too for Redis brokers: the message and the job's ``queued`` record go
in one round trip, where Celery's ``send_task`` takes several.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from datetime import UTC, datetime
from typing import Any

from ..names import TASK_NAME

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def job_kwargsrepr(job: Any) -> str:
    """What Flower and the worker log show as a build's arguments: the job id and tags, never the
    whole job (build args, labels) nor the attempts a retry carries. ``job`` as sent (dict or JSON)."""
    if isinstance(job, str):
        try:
            job = json.loads(job)
        except ValueError:
            job = None
    if not isinstance(job, dict):
        return "{'job': '?'}"
    tags = job.get("tags")
    tags = list(tags) if isinstance(tags, list | tuple) else []
    return f"{{'job': {job.get('job_id')!r}, 'tags': {tags!r}}}"


def build_message(
    job_id: str,
    queue: str,
    kwargs: dict[str, Any],
    *,
    kwargsrepr: str = "{}",
    delivery_tag: str | None = None,
    eta: float | None = None,
    retries: int = 0,
) -> bytes:
    """The Redis-transport message of one ``buildq.build`` task (protocol v2, JSON body); ``eta``
    (epoch seconds) makes the worker that receives it hold it until then (a retry's countdown)."""
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
            "kwargsrepr": kwargsrepr,
            "origin": _ORIGIN,
            "ignore_result": False,
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag or str(uuid.uuid4()),
        },
    }
    return json.dumps(message, separators=(",", ":")).encode()
