"""The circuit breaker of each BuildKit daemon, shared by every worker of the deployment.

A daemon that does not answer (dial refused, GOAWAY, connection lost) is marked down
(:meth:`DaemonHealth.mark_down`, ``lua/breaker.lua``): it moves past every limit in each load
index, so no claim picks it and no build is launched against it. One probe at a time
(:meth:`DaemonHealth.try_probe`, a lock that expires) checks whether it answers again;
:meth:`DaemonHealth.mark_up` closes the breaker. Each transition is reported once:
the call that made it returns True (or the seconds it was down).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .keys import DAEMONS_DOWN, DAEMONS_ERROR, DAEMONS_UP, LOADS, daemon_hold_key, daemon_probe_key
from .scripts import Scripts

ERROR_CHARS = 300


@dataclass(frozen=True)
class DaemonState:
    """One daemon: ``up`` or not, ``since`` (epoch seconds; None: up and never seen down), last error."""

    daemon: str
    up: bool
    since: float | None
    error: str | None


def _text(value: Any) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class DaemonHealth:
    """Reads and writes the breakers (three small hashes, see :mod:`buildq.store.keys`)."""

    def __init__(self, client: Any) -> None:
        self.redis = client
        self.scripts = Scripts(client)

    def _breaker(self, action: str, daemon: str, now: float, error: str = "", hold_s: float = 0.0) -> Any:
        return self.scripts.call(
            "breaker", down_hash=DAEMONS_DOWN, up_hash=DAEMONS_UP, error_hash=DAEMONS_ERROR,
            hold_key=daemon_hold_key(daemon), loads=LOADS, action=action, daemon=daemon, at=repr(now),
            error=error[:ERROR_CHARS], hold_ms=max(0, int(hold_s * 1000)),
        )  # fmt: skip

    def mark_down(self, daemon: str, error: str, now: float, *, hold_s: float = 0.0) -> bool:
        """Open ``daemon``'s breaker; True when this call opened it (it was up). With ``hold_s`` the
        breaker stays open at least that long whatever a probe says (a full disk answers probes)."""
        return bool(self._breaker("down", daemon, now, error, hold_s))

    def held(self, daemon: str) -> bool:
        """Whether ``daemon``'s breaker must stay open for now (see :meth:`mark_down`)."""
        return bool(self.redis.exists(daemon_hold_key(daemon)))

    def mark_up(self, daemon: str, now: float) -> float | None:
        """Close ``daemon``'s breaker; the seconds it was down when this call closed it, else None."""
        since = _text(self._breaker("up", daemon, now))
        if not since:
            return None
        return max(0.0, now - float(since))

    def down(self) -> dict[str, float]:
        """The daemons that are down, with the time each went down."""
        raw = self.redis.hgetall(DAEMONS_DOWN)
        return {str(_text(k)): float(_text(v) or 0.0) for k, v in raw.items()}

    def states(self, daemons: Sequence[str]) -> list[DaemonState]:
        """Up or down, since when, and the last error, for each of ``daemons`` (one round trip)."""
        if not daemons:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in (DAEMONS_DOWN, DAEMONS_UP, DAEMONS_ERROR):
            pipe.hmget(key, list(daemons))
        down, up, errors = pipe.execute()
        out = []
        for daemon, d, u, e in zip(daemons, down, up, errors, strict=True):
            if d is not None:
                out.append(DaemonState(daemon, False, float(_text(d) or 0.0), _text(e)))
            else:
                back = _text(u)
                out.append(DaemonState(daemon, True, float(back) if back is not None else None, None))
        return out

    def try_probe(self, daemon: str, ttl_s: float) -> bool:
        """Take the probe lock of ``daemon`` for ``ttl_s``; False when another worker probes it."""
        return bool(self.redis.set(daemon_probe_key(daemon), "1", nx=True, px=max(1, int(ttl_s * 1000))))

    def probe_done(self, daemon: str, next_in_s: float) -> None:
        """The probe of ``daemon`` ended: the next one may start ``next_in_s`` from now."""
        self.redis.pexpire(daemon_probe_key(daemon), max(1, int(next_in_s * 1000)))
