"""buildq's Lua scripts: ``lua/<name>.lua`` files, each naming its ``KEYS`` and ``ARGV`` at the top.

A script's main file opens with one ``local <name> = KEYS[i]`` (or ``ARGV[i]``, maybe inside
``tonumber(...)``) per key and argument, and at most one variadic tail
``local <name> = {unpack(KEYS|ARGV, i)}``. :class:`Script` reads those lines, so a caller passes
every key and argument by name (:meth:`Script.call`), and a name missing, unknown or in the
wrong place fails at once, naming it. Shared parts (the server-clock prelude, reading a job hash
and giving back its slot, the load index) are put in front of the main file as :data:`PARTS` says.

:class:`Scripts` runs them on one Redis client with ``EVALSHA`` of the script's own SHA1 (loading
it where Redis does not have it: a new Redis, a restart, a new master; a pool process loads them
all as it starts, :meth:`Scripts.preload`) and, for the writes that must survive a failover
(:meth:`Scripts.durable`), waits for the replicas (``WAIT``) on the same connection.
:class:`Replicas` decides how many: ``BUILDQ_SUBMIT_REPLICAS``, or by default 1 while the master
has a replica, else 0.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.exceptions

from ..errors import NotReplicatedError, RedisUnavailable

if TYPE_CHECKING:
    from ..config import Settings

logger = logging.getLogger("buildq.store")

LUA_DIR = Path(__file__).with_name("lua")

#: the shared parts each script is put together with, in front of its own file
PARTS: dict[str, tuple[str, ...]] = {
    "submit": ("prelude", "supersede_fn"),
    "supersede": ("prelude", "supersede_fn"),
    "export_lease": ("prelude", "job_fn", "export_fn"),
    "claim": ("prelude", "job_fn", "load_fn", "export_fn"),
    "take_slot": ("prelude", "job_fn", "load_fn"),
    "renew": ("prelude",),
    "requeue": ("prelude", "job_fn", "export_fn"),
    "finish": ("job_fn", "export_fn"),
    "reject": ("prelude", "job_fn"),
    "release": ("prelude", "job_fn"),
    "heartbeat": ("prelude",),
    "restore_stalled": ("prelude", "queue_fn"),
    "lost": ("prelude", "queue_fn"),
    "push_lost": ("prelude", "queue_fn"),
    "expired_slots": ("prelude", "job_fn"),
    "register_load": ("load_fn",),
    "breaker": ("load_fn",),
    "gauges": ("prelude",),
}

_NAMED = re.compile(r"^local (\w+)\s*=\s*(?:tonumber\()?(KEYS|ARGV)\[(\d+)\]")
_TAIL = re.compile(r"^local (\w+)\s*=\s*\{unpack\((KEYS|ARGV),\s*(\d+)\)\}")


@dataclass(frozen=True)
class Names:
    """A script's names for one of its tables (``KEYS`` or ``ARGV``), in order, and its tail."""

    fixed: tuple[str, ...]
    tail: str | None = None


def read_names(text: str, table: str) -> Names:
    """The names a script's main file gives to ``KEYS`` or ``ARGV`` (its ``local`` lines)."""
    fixed: dict[int, str] = {}
    tail: tuple[int, str] | None = None
    for line in text.splitlines():
        named = _NAMED.match(line)
        if named and named.group(2) == table:
            fixed[int(named.group(3))] = named.group(1)
        rest = _TAIL.match(line)
        if rest and rest.group(2) == table:
            tail = (int(rest.group(3)), rest.group(1))
    if sorted(fixed) != list(range(1, len(fixed) + 1)):
        raise ValueError(f"{table} positions {sorted(fixed)} are not 1..{len(fixed)}")
    if tail is not None and tail[0] != len(fixed) + 1:
        raise ValueError(f"the {table} tail {tail[1]!r} must start at {len(fixed) + 1}, not {tail[0]}")
    return Names(tuple(fixed[i] for i in range(1, len(fixed) + 1)), tail[1] if tail else None)


class Script:
    """One script: its whole source, and the names of its keys and arguments."""

    def __init__(self, name: str) -> None:
        own = (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
        parts = [(LUA_DIR / f"{part}.lua").read_text(encoding="utf-8") for part in PARTS.get(name, ())]
        self.name = name
        self.source = "".join([*parts, own])
        try:
            self.keys, self.args = read_names(own, "KEYS"), read_names(own, "ARGV")
        except ValueError as exc:
            raise ValueError(f"lua/{name}.lua: {exc}") from None
        both = set(self.keys.fixed) & set(self.args.fixed)
        if both:
            raise ValueError(f"lua/{name}.lua names {sorted(both)} both a key and an argument")
        #: what Redis names it (SHA1 of the source): EVALSHA needs no SCRIPT LOAD of this process
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    def positional(self, values: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV in the script's order from ``values`` by name (TypeError naming a missing
        or unknown name)."""
        wanted = [*self.keys.fixed, *self.args.fixed, *(t for t in (self.keys.tail, self.args.tail) if t)]
        missing = [n for n in wanted if n not in values]
        unknown = sorted(set(values) - set(wanted))
        if missing or unknown:
            raise TypeError(f"script {self.name}: missing {missing}, unknown {unknown}")
        keys = [values[n] for n in self.keys.fixed] + list(_tail(values, self.keys.tail))
        args = [values[n] for n in self.args.fixed] + list(_tail(values, self.args.tail))
        return keys, args


def _tail(values: dict[str, Any], name: str | None) -> Sequence[Any]:
    return values[name] if name is not None else ()


def script_names() -> list[str]:
    """Every script (the main files of ``lua/``, not the shared parts)."""
    parts = {part for used in PARTS.values() for part in used}
    return sorted(p.stem for p in LUA_DIR.glob("*.lua") if p.stem not in parts)


@functools.cache
def script(name: str) -> Script:
    """Script ``name``, read from disk once per process."""
    return Script(name)


class Scripts:
    """The scripts run on one Redis client: ``scripts.call("claim", job_id=…, …)``."""

    def __init__(self, client: Any, replicas: Any = None) -> None:
        self._client = client
        #: a :class:`buildq.store.connect.Replicas`: how many replicas :meth:`durable` waits for
        self.replicas = replicas

    def call(self, name: str, **values: Any) -> Any:
        """Run script ``name`` with its keys and arguments by name; its reply."""
        s = script(name)
        keys, args = s.positional(values)
        try:
            return self._client.evalsha(s.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a new or restarted Redis, a new master: load it there
            return self._client.evalsha(self._load(s), len(keys), *keys, *args)

    def durable(self, name: str, *, what: str, strict_job: str | None = None, **values: Any) -> Any:
        """Like :meth:`call`, then ``WAIT`` for the replicas on the same connection (one round trip)
        when replicas are wanted; a warning when fewer confirmed within the timeout, or, with
        ``strict_job``, :class:`~buildq.errors.NotReplicatedError` for that job."""
        replicas = self.replicas
        try:
            wanted = replicas.target() if replicas is not None else 0
            if wanted == 0:
                return self.call(name, **values)
            s = script(name)
            keys, args = s.positional(values)
            while True:
                pipe = self._client.pipeline(transaction=False)
                pipe.evalsha(s.sha, len(keys), *keys, *args)
                pipe.wait(wanted, replicas.timeout_ms)
                reply, reached = pipe.execute(raise_on_error=False)
                if isinstance(reply, redis.exceptions.NoScriptError):
                    self._load(s)
                    continue
                for answer in (reply, reached):
                    if isinstance(answer, Exception):
                        raise answer
                if replicas.short(reached, wanted):
                    if strict_job is not None:
                        raise NotReplicatedError(strict_job, reached, wanted, replicas.timeout_ms / 1000)
                    logger.warning(
                        "%s reached %d of %d replicas within %d ms (kept on the master only)",
                        what, reached, wanted, replicas.timeout_ms,
                    )  # fmt: skip
                return reply
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if replicas is not None:  # maybe a failover: ask the (new) master for its replicas again
                replicas.forget()
            raise

    def preload(self, names: Sequence[str] | None = None) -> None:
        """Load ``names`` (default: every script) into Redis in one round trip, so that no build
        waits for a SCRIPT LOAD (a pool process does it as it starts). Best effort: a script Redis
        does not have is loaded where it is first run anyway."""
        pipe = self._client.pipeline(transaction=False)
        for name in names if names is not None else script_names():
            pipe.script_load(script(name).source)
        try:
            pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, RedisUnavailable) as exc:
            logger.info("scripts not preloaded (%s); each is loaded when first run", exc)

    def _load(self, s: Script) -> str:
        self._client.script_load(s.source)
        return s.sha


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


def replicas_for(settings: Settings, client: Any) -> Replicas:
    return Replicas(client, wanted=settings.submit_replicas, timeout_s=settings.replica_wait_timeout_s)
