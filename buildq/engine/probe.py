"""Does a BuildKit daemon answer? ``buildctl debug workers`` through the launcher, like a build.

Used by ``buildq health`` and by the worker's :class:`~buildq.engine.daemonwatch.DaemonWatch`,
which closes a daemon's circuit breaker when it answers again. A probe is not a build.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..buildkit.progress import ERROR_PREFIX
from ..launchers.base import Launcher, LaunchSpec

#: seconds the reader thread may need past the deadline to hand over what it read
GRACE_S = 2.0


@dataclass(frozen=True)
class ProbeResult:
    """``ok`` when buildctl exited 0 in time; ``detail`` is one line; ``seconds`` how long it took."""

    ok: bool
    detail: str
    seconds: float


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def probe_daemon(
    launcher: Launcher, daemon: str, timeout_s: float, *, probe_id: str = "probe"
) -> ProbeResult:
    """Run ``buildctl debug workers`` against ``daemon``; ok when it exits 0 within ``timeout_s``."""
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        paths = launcher.prepare(probe_id, None, None)
        spec = LaunchSpec(job_id=probe_id, argv=["debug", "workers"], env={"BUILDKIT_HOST": daemon})
        run = launcher.start(spec, paths)
    except Exception as exc:
        detail = f"cannot start buildctl: {one_line(f'{type(exc).__name__}: {exc}')}"
        return ProbeResult(False, detail, time.monotonic() - started)
    lines: list[str] = []

    def read() -> None:
        try:
            lines.extend(run.lines())
        except Exception:  # the stream was closed under us after a kill: keep what was read
            pass

    reader = threading.Thread(target=read, daemon=True, name=f"{probe_id}-stderr")
    try:
        reader.start()
        try:
            rc: int | None = run.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            rc = None
            run.kill()
        reader.join(timeout=max(0.5, min(GRACE_S, deadline - time.monotonic())))
    finally:
        run.close()
    seconds = time.monotonic() - started
    if rc is None:
        return ProbeResult(False, f"no answer within {timeout_s:g}s (buildctl killed)", seconds)
    if rc == 0:
        return ProbeResult(True, "buildctl debug workers: exit 0", seconds)
    return ProbeResult(False, f"exit {rc}: {failure_text(lines)}", seconds)


def failure_text(lines: list[str]) -> str:
    """The last ``error:`` line of buildctl's stderr (without the prefix), else its last line."""
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return one_line(line[len(ERROR_PREFIX) :])
    rest = [line for line in lines if line.strip()]
    return one_line(rest[-1]) if rest else "no error text on stderr"
