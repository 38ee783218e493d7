"""The one place a redis-py client is made from the settings: a plain Redis URL, or Redis Sentinel.

``sentinel://[:PASSWORD@]h1:26379/DB;sentinel://h2:26379;…`` with ``BUILDQ_SENTINEL_MASTER`` is
served by redis-py's ``Sentinel(...).master_for(master)``: every command goes to the current
master, and after a failover the pool asks the sentinels again (as kombu's ``sentinel://``
transport and Celery's sentinel result backend do). The URL's password and DB are the master's;
``BUILDQ_SENTINEL_PASSWORD`` is the sentinels' own.

:class:`Replicas` decides how many replicas a write must reach (``WAIT``) before buildq counts it
as done: ``BUILDQ_SUBMIT_REPLICAS``, or by default 1 while the master has a replica, else 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from ..config import Settings

SENTINEL_SCHEME = "sentinel://"
DEFAULT_SENTINEL_PORT = 26379


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelAddress:
    """What a ``sentinel://`` URL names: the sentinels, and the master's DB and credentials."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelAddress:
    """``sentinel://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` chunks separated by ``;`` (kombu's and
    Celery's format); DB and credentials from the first chunk that has them."""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for chunk in (c.strip() for c in url.split(";")):
        if not chunk:
            continue
        if not chunk.startswith(SENTINEL_SCHEME):
            raise ValueError(f"{chunk!r} is not a sentinel:// address")
        parts = urlsplit(chunk)
        if not parts.hostname:
            raise ValueError(f"{chunk!r} names no sentinel host")
        sentinels.append((parts.hostname, parts.port or DEFAULT_SENTINEL_PORT))
        path = parts.path.strip("/")
        if path and not db:
            if not path.isdigit():
                raise ValueError(f"{chunk!r}: the DB must be a number, not {path!r}")
            db = int(path)
        if parts.password is not None and password is None:
            password = unquote(parts.password)
            username = unquote(parts.username) if parts.username else None
    if not sentinels:
        raise ValueError("no sentinel address")
    return SentinelAddress(tuple(sentinels), db, username, password)


def same_redis_url(settings: Settings, a: str | None, b: str | None) -> bool:
    """Whether two URLs of ``settings`` name the same Redis DB (for sentinel URLs: any sentinels of
    the same master, same DB)."""
    if not a or not b:
        return False
    if is_sentinel_url(a) and is_sentinel_url(b):
        return parse_sentinel_url(a).db == parse_sentinel_url(b).db
    return a == b


def redis_client(settings: Settings, url: str | None = None, **options: Any) -> redis.Redis:
    """A redis-py client on ``url`` (default: the state Redis), through the sentinels when it is a
    ``sentinel://`` URL; ``options`` are connection options (``socket_timeout``, ``retry``, …)."""
    url = url or settings.state_redis_url
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    if not settings.sentinel_master:
        raise ValueError("BUILDQ_SENTINEL_MASTER is required with a sentinel:// URL")
    address = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options
    }
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get_secret_value()
    sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs)
    credentials = {"username": address.username, "password": address.password}
    master = sentinel.master_for(
        settings.sentinel_master,
        db=address.db,
        **{k: v for k, v in credentials.items() if v is not None},
        **options,
    )
    return master


class Replicas:
    """How many replicas a write must reach before it counts, and how long to wait for them.

    ``wanted`` (``BUILDQ_SUBMIT_REPLICAS``) None means: 1 while the master has a connected replica,
    0 otherwise (``INFO replication``, asked again after ``refresh_s`` or after :meth:`forget`,
    e.g. when a failover broke the connection).
    """

    def __init__(
        self,
        client: Any,
        *,
        wanted: int | None,
        timeout_s: float,
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.wanted, self.timeout_ms = client, wanted, max(1, int(timeout_s * 1000))
        self.refresh_s, self.clock = refresh_s, clock
        self._known: tuple[float, int] | None = None

    def target(self) -> int:
        if self.wanted is not None:
            return self.wanted
        now = self.clock()
        if self._known is None or now - self._known[0] >= self.refresh_s:
            info = self.client.info("replication")
            self._known = (now, min(1, int(info.get("connected_slaves", 0))))
        return self._known[1]

    def forget(self) -> None:
        self._known = None

    def short(self, reached: int, wanted: int) -> bool:
        """Whether ``reached`` confirmations are too few. By default only while the master still
        has a replica (asked again: after a failover the new master may have none to wait for)."""
        if reached >= wanted:
            return False
        if self.wanted is not None:
            return True
        self.forget()
        return reached < self.target()


def execute_waiting(pipe: Any, replicas: Replicas | None) -> tuple[int, int, float] | None:
    """Execute ``pipe`` ending with ``WAIT`` when replicas are wanted; None when enough confirmed,
    else (confirmed, wanted, timeout in seconds)."""
    wanted = replicas.target() if replicas is not None else 0
    if replicas is not None and wanted:
        pipe.wait(wanted, replicas.timeout_ms)
    try:
        reached = pipe.execute()[-1]
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        if replicas is not None:  # maybe a failover: ask the new master for its replicas again
            replicas.forget()
        raise
    if replicas is None or not wanted or not replicas.short(reached, wanted):
        return None
    return reached, wanted, replicas.timeout_ms / 1000


def replicas_for(settings: Settings, client: Any) -> Replicas:
    return Replicas(client, wanted=settings.submit_replicas, timeout_s=settings.replica_wait_timeout_s)
