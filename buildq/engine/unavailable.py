"""The message of a job that gave up waiting for a BuildKit daemon (pure)."""

from __future__ import annotations

from ..store.daemons import DaemonState


def unavailable_message(states: list[DaemonState], wait_s: float, now: float) -> str:
    """Why a job gave up waiting: each daemon that is down, for how long, and its last error."""
    parts = [
        f"{d.daemon} down for {now - (d.since or now):.0f}s ({d.error or 'no answer'})"
        for d in states
        if not d.up
    ]
    return f"no BuildKit daemon answered within BUILDQ_DAEMON_WAIT_S={wait_s:g}s: " + "; ".join(parts)
