"""A worker's pool-process runtime in the test's own process (no Celery): a real
:class:`~buildq.engine.runtime.PoolRuntime` on the test Redis with the buildctl stand-in, and the
queue's messages read as a worker receives them, to hand to :meth:`Lifecycle.handle` directly."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from buildq.config import load_settings
from buildq.contract.wire import Delivery, read_delivery
from buildq.engine.runtime import PoolRuntime
from tests.harness import base_env


def pool_env(db: int, queue: str, standin: Path, state_dir: Path, **extra: str) -> dict[str, str]:
    """BUILDQ_* variables of an in-process deployment on DB ``db`` (flushed by :func:`pool_runtime`)."""
    return base_env(
        db, queue, BUILDQ_BUILDCTL_PATH=str(standin), BUILDQ_LOCAL_STATE_DIR=str(state_dir), **extra
    )


@contextmanager
def pool_runtime(env: Mapping[str, str], **settings: Any) -> Iterator[PoolRuntime]:
    """A PoolRuntime made from ``env`` (its DB flushed before and after), closed at the end. The
    stand-in reads ``STANDIN_*`` from this process's environment (monkeypatch it)."""
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    r.flushdb()
    rt = PoolRuntime(load_settings({k: v for k, v in env.items() if k.startswith("BUILDQ_")}, **settings))
    try:
        yield rt
    finally:
        rt.close()
        r.flushdb()
        r.close()


def deliver(r: redis.Redis, queue: str) -> Delivery:
    """The oldest message of ``queue`` as a worker receives it (popped)."""
    raw = r.rpop(queue)
    assert raw is not None, f"no message in {queue}"
    message = json.loads(raw)
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    headers = message["headers"]
    return read_delivery(tuple(args), kwargs, task_id=headers["id"], queue=queue, retries=headers["retries"])
