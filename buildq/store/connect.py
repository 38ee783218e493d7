"""The one place a redis-py client is made from the settings: a plain Redis URL, or Redis Sentinel.

``sentinel://[:PASSWORD@]h1:26379/DB;sentinel://h2:26379;…`` with ``BUILDQ_SENTINEL_MASTER`` is
served by redis-py's ``Sentinel(...).master_for(master)``: every command goes to the current
master, and after a failover the pool asks the sentinels again (as kombu's ``sentinel://``
transport and Celery's sentinel result backend do). The URL's password and DB are the master's;
``BUILDQ_SENTINEL_PASSWORD`` is the sentinels' own.

Every client rides through a failover or a short outage (:class:`Patience`): a command that finds
Redis away (refused, reset, timed out, a master just demoted to a replica, Redis still loading its
data) is tried again with a jittered backoff, on a new connection — through Sentinel that asks for
the master again — for up to ``BUILDQ_REDIS_RETRY_S``; past that it raises
:class:`~buildq.errors.RedisUnavailable` naming the Redis (never its password).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import AbstractBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from ..config import Settings
from ..errors import RedisUnavailable

log = logging.getLogger("buildq.store")

#: what a command meets while Redis restarts or Sentinel elects a new master: tried again
AWAY = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
)


class Patience(Retry):
    """redis-py's retry policy with a time budget: try again (jittered backoff from 0.05 s up to
    1 s, a new connection each time) until ``budget_s`` has passed, then raise
    :class:`~buildq.errors.RedisUnavailable`. The first failure of a series is logged once.

    redis-py's own loop (``Retry.call_with_retry``) runs every command: nothing of buildq runs
    while Redis answers. Only a failure reaches :class:`_Budget` (the backoff), which decides. A
    reconnect that redis-py makes inside a command's retry (``connect_check_health``) gets one
    try there: the command's next try makes a new connection (through Sentinel: to the master the
    sentinels name now) instead of dialling a dead master again and again."""

    def __init__(self, budget_s: float, where: str) -> None:
        super().__init__(_Budget(budget_s, where), retries=-1, supported_errors=AWAY)
        self.budget_s, self.where = budget_s, where


#: the code of redis-py's retry loop: a failure inside two of them is a reconnect inside a command
_RETRY_LOOP = Retry.call_with_retry.__code__


class _Budget(AbstractBackoff):
    """The pause before the next try, asked by redis-py's retry loop only after a failure (in its
    ``except`` block: the error is the one being handled). Raises instead of pausing when the try
    was a reconnect inside a command's retry (the command tries again), or when the pause would
    pass the budget (:class:`~buildq.errors.RedisUnavailable`). ``reset`` is redis-py's own."""

    def __init__(self, budget_s: float, where: str) -> None:
        self.budget_s, self.where = budget_s, where
        self._started = 0.0  # when the series of failures began (redis-py copies it per connection)

    def compute(self, failures: int) -> float:
        error = sys.exc_info()[1]
        if isinstance(error, AWAY) and _retry_loops() > 1:
            raise error  # a reconnect inside a command's retry: that command tries again
        now = time.monotonic()
        if failures == 1:
            self._started = now
        waited = now - self._started
        pause = min(1.0, 0.05 * 2 ** min(failures, 5)) * (0.5 + random.random() / 2)
        if waited + pause > self.budget_s:
            raise RedisUnavailable(self.where, _cause(error), max(waited, self.budget_s)) from error
        if failures == 1:
            log.warning("Redis at %s does not answer (%s); trying again for up to %.0f s",
                        self.where, _cause(error), self.budget_s)  # fmt: skip
        return pause


def _retry_loops() -> int:
    """How many of redis-py's retry loops are running on this thread's stack."""
    frame: FrameType | None = sys._getframe(1)
    loops = 0
    while frame is not None:
        loops += frame.f_code is _RETRY_LOOP
        frame = frame.f_back
    return loops


def _cause(error: BaseException | None) -> str:
    """The last error, briefly: ``connection refused``, ``timed out``, ``a read-only replica``…"""
    text = str(error).lower()
    for needle, said in (
        ("refused", "connection refused"), ("timed out", "timed out"), ("timeout", "timed out"),
        ("read only", "a read-only replica answered"), ("readonly", "a read-only replica answered"),
        ("loading", "Redis is loading its data"), ("no master", "no master known to the sentinels"),
        ("reset", "connection reset"), ("closed", "connection closed"),
    ):  # fmt: skip
        if needle in text:
            return said
    return " ".join(str(error).split())[:200] or type(error).__name__


def describe(settings: Settings, url: str) -> str:
    """Where a Redis URL points, for messages: scheme, host, port and DB (no password); for Sentinel
    also the master's name."""
    parts = urlsplit(url.split(";")[0])
    where = (
        f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path or ''}"
    )
    if is_sentinel_url(url):
        where += f" (Sentinel master {settings.sentinel_master})"
    return where


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


class RediscoveringConnection(SentinelManagedConnection):
    """A connection to the Sentinel master that asks the sentinels where the master is each time it
    connects again. redis-py 8 reconnects a dropped connection inside a command's retry through
    ``connect_check_health``, which skips the Sentinel lookup of ``connect()``: the retry dialled the
    dead master until its budget ran out, though the sentinels had named a new one seconds after."""

    _addressed = False  # inside connect_to: the address was just asked for

    def connect_to(self, address: Any) -> Any:
        self._addressed = True
        try:
            return super().connect_to(address)
        finally:
            self._addressed = False

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> Any:
        if self._sock is None and not self._addressed and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super().connect_check_health(check_health, retry_socket_connect)


def redis_client(
    settings: Settings, url: str | None = None, *, patience_s: float | None = None, **options: Any
) -> redis.Redis:
    """A redis-py client on ``url`` (default: the state Redis), through the sentinels when it is a
    ``sentinel://`` URL, that rides through outages for ``patience_s`` (default
    ``BUILDQ_REDIS_RETRY_S``; see :class:`Patience`); ``options`` are connection options."""
    url = url or settings.state_redis_url
    budget = settings.redis_retry_s if patience_s is None else patience_s
    options.setdefault("retry", Patience(budget, describe(settings, url)))
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
    connection: dict[str, Any] = {k: v for k, v in credentials.items() if v is not None}
    connection.update(options, connection_class=RediscoveringConnection)
    master: redis.Redis = sentinel.master_for(settings.sentinel_master, db=address.db, **connection)
    return master


def persistence_problem(client: Any) -> str | None:
    """What is wrong with how ``client``'s Redis keeps its data across a restart (None: it keeps an
    append-only file). Without one, a restart loses every queued and running job, and buildq's own
    copies of their messages with them (they live in the same Redis)."""
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
        save = client.config_get("save").get("save")
    except redis.exceptions.ResponseError as exc:
        return f"cannot tell whether Redis keeps its data (CONFIG GET refused: {exc})"
    if appendonly == "yes":
        return None
    kept = (
        "no RDB snapshots either"
        if not save
        else f"only RDB snapshots ({save}): the writes since the last one"
    )
    return f"Redis keeps no append-only file (appendonly no; {kept}): a restart loses queued and running jobs"
