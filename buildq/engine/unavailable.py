"""The message of a job that gave up waiting for a BuildKit daemon (pure)."""

from __future__ import annotations

from ..config import Settings
from ..store.daemons import DaemonHealth, DaemonState


def give_up_text(states: list[DaemonState], wait_s: float, now: float) -> str:
    """Why a job gave up waiting: each daemon that is down, for how long, and its last error."""
    parts = [
        f"{d.daemon} down for {now - (d.since or now):.0f}s ({d.error or 'no answer'})"
        for d in states
        if not d.up
    ]
    return f"no BuildKit daemon answered within BUILDQ_DAEMON_WAIT_S={wait_s:g}s: " + "; ".join(parts)


def unavailable_message(health: DaemonHealth | None, settings: Settings, now: float) -> str:
    """:func:`give_up_text` for the daemons of ``settings`` as ``health`` sees them now."""
    states = health.states(settings.daemons) if health is not None else []
    return give_up_text(states, settings.daemon_wait_s, now)
