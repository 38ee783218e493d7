"""Each repository's baseline: the phases of its last successful builds (at most ``BUILDQ_BASELINE_N``).

One Redis list per cache key (``buildq:baseline:<cache key>``, newest first), each element the
JSON entry :func:`buildq.engine.explain.baseline_entry` made of a build that succeeded in one attempt.
:func:`~buildq.store.claim.finish` pushes the entry, trims the list to N and renews its
:data:`BASELINE_TTL_S` in the same round trip (``lua/finish.lua``) that stores the result;
:func:`read_baseline` reads it (one round trip, taken only by a build that has a phase worth
comparing, see :func:`buildq.engine.explain.needs_baseline`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .keys import baseline_key

#: a repository not built for this long loses its baseline (renewed by every successful build)
BASELINE_TTL_S = 30 * 24 * 3600
#: made once (``json.dumps`` with options makes an encoder per call)
_encode = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class BaselineWrite:
    """What :func:`~buildq.store.claim.finish` adds to a baseline: the list's key, the JSON entry, N."""

    key: str
    entry: bytes
    n: int


def baseline_write(cache_key: str, entry: dict[str, Any] | None, n: int) -> BaselineWrite | None:
    """The write for ``entry`` (None: nothing to add)."""
    if entry is None:
        return None
    return BaselineWrite(baseline_key(cache_key), _encode(entry).encode(), n)


def read_baseline(client: Any, cache_key: str, n: int) -> list[dict[str, Any]]:
    """The newest ``n`` entries of ``cache_key``'s baseline (one ``LRANGE``)."""
    return parse_entries(client.lrange(baseline_key(cache_key), 0, n - 1))


def parse_entries(items: Sequence[bytes]) -> list[dict[str, Any]]:
    """The entries of an ``LRANGE`` reply, parsed at once; one that is not a JSON object is skipped."""
    if not items:
        return []
    try:
        parsed = json.loads(b"[" + b",".join(items) + b"]")
    except ValueError:
        parsed = []
        for item in items:
            try:
                parsed.append(json.loads(item))
            except ValueError:
                continue
    return [entry for entry in parsed if isinstance(entry, dict)]
