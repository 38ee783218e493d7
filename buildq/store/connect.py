"""The one place a redis-py client is made from the settings: a plain Redis URL, or Redis Sentinel.

``sentinel://[:PASSWORD@]h1:26379/DB;sentinel://h2:26379;…`` with ``BUILDQ_SENTINEL_MASTER`` is
served by redis-py's ``Sentinel(...).master_for(master)``: every command goes to the current
master, and after a failover the pool asks the sentinels again (as kombu's ``sentinel://``
transport and Celery's sentinel result backend do). The URL's password and DB are the master's;
``BUILDQ_SENTINEL_PASSWORD`` is the sentinels' own.
"""

from __future__ import annotations

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
    connection: dict[str, Any] = {k: v for k, v in credentials.items() if v is not None}
    connection.update(options)
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
