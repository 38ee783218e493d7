"""buildq's Lua scripts: kept as ``lua/*.lua`` files, read once, registered once per Redis client.

A script is named by its file; some are put together from shared parts (the server-clock prelude
and the ``acquire_any`` function of the daemon slots), see :data:`PARTS`. :class:`Scripts` hands
out redis-py ``Script`` objects (run with ``EVALSHA``, loaded again when Redis lost them);
:meth:`Scripts.durable` runs one and then waits (``WAIT``, same connection) for the replicas.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import redis.exceptions

logger = logging.getLogger("buildq.store")

LUA_DIR = Path(__file__).with_name("lua")

#: scripts made of several files, in order
PARTS: dict[str, tuple[str, ...]] = {
    "claim": ("prelude", "acquire_any_fn", "affinity_fn", "claim"),
    "acquire_any": ("prelude", "acquire_any_fn", "acquire_any"),
    "renew_slot": ("prelude", "renew_slot"),
}


@functools.cache
def source(name: str) -> str:
    """The Lua source of script ``name`` (read from disk once per process)."""
    return "".join((LUA_DIR / f"{part}.lua").read_text(encoding="utf-8") for part in PARTS.get(name, (name,)))


class Scripts:
    """The registered scripts of one Redis client (``scripts("claim")(keys=…, args=…)``)."""

    def __init__(self, client: Any, replicas: Any = None) -> None:
        self._client = client
        self._registered: dict[str, Any] = {}
        #: a :class:`buildq.store.connect.Replicas`: how many replicas :meth:`durable` waits for
        self.replicas = replicas

    def __call__(self, name: str) -> Any:
        script = self._registered.get(name)
        if script is None:
            script = self._registered[name] = self._client.register_script(source(name))
        return script

    def durable(self, name: str, *, keys: list[Any], args: list[Any], what: str) -> Any:
        """Run script ``name`` and, when replicas are wanted, ``WAIT`` for them on the same
        connection (one round trip); logs a warning when fewer confirmed within the timeout."""
        replicas = self.replicas
        try:
            wanted = replicas.target() if replicas is not None else 0
            if wanted == 0:
                return self(name)(keys=keys, args=args)
            script = self(name)
            while True:
                pipe = self._client.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.wait(wanted, replicas.timeout_ms)
                reply, reached = pipe.execute(raise_on_error=False)
                if isinstance(reply, redis.exceptions.NoScriptError):  # a new master: load it there
                    script.sha = self._client.script_load(script.script)
                    continue
                for answer in (reply, reached):
                    if isinstance(answer, Exception):
                        raise answer
                if replicas.short(reached, wanted):
                    logger.warning(
                        "%s reached %d of %d replicas within %d ms (kept on the master only)",
                        what, reached, wanted, replicas.timeout_ms,
                    )  # fmt: skip
                return reply
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if replicas is not None:  # maybe a failover: ask the (new) master for its replicas again
                replicas.forget()
            raise
