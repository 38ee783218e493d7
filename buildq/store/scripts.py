"""buildq's Lua scripts: kept as ``lua/*.lua`` files, read once, registered once per Redis client.

A script is named by its file; some are put together from shared parts (the server-clock prelude
and the ``acquire_any`` function of the daemon slots), see :data:`PARTS`. :class:`Scripts` hands
out redis-py ``Script`` objects (run with ``EVALSHA``, loaded again when Redis lost them).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

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

    def __init__(self, client: Any) -> None:
        self._client = client
        self._registered: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        script = self._registered.get(name)
        if script is None:
            script = self._registered[name] = self._client.register_script(source(name))
        return script
