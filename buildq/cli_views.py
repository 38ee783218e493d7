"""Terminal views of ``buildq list`` and of ``submit --wait``'s live progress (pure text builders
over data, plus the rich Live loop)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def ago(seconds: float | None) -> str:
    """``42s``, ``3m``, ``5h``, ``2d`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def list_lines(rows: list[dict[str, Any]], depths: Mapping[str, int], now: float) -> list[list[str]]:
    """The cells of ``buildq list``: job, state, phase, age, duration, image (one row per job)."""
    out = []
    for row in rows:
        enqueued = row.get("enqueued_at")
        duration = row.get("duration_s")
        image = row.get("image") or "-"
        if row.get("retry_of"):
            image = f"{image}  (retry of {row['retry_of']})"
        out.append(
            [
                str(row["job_id"]),
                str(row.get("state") or "-"),
                str(row.get("phase") or "-"),
                ago(now - enqueued if enqueued else None),
                f"{duration:.1f}s" if isinstance(duration, int | float) else "-",
                image,
            ]
        )
    return out


def render_list(rows: list[dict[str, Any]], depths: Mapping[str, int], now: float, console: Console) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("JOB", "STATE", "PHASE", "AGE", "DURATION", "IMAGE"):
        table.add_column(name, no_wrap=name != "IMAGE", overflow="fold")
    for cells in list_lines(rows, depths, now):
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
    waiting = ", ".join(f"{queue} {n}" for queue, n in depths.items())
    console.print(f"queued messages: {escape(waiting) if waiting else 'n/a (broker is not Redis)'}")


def progress_line(status: Mapping[str, Any], steps: tuple[int, int, int] | None, elapsed: float) -> str:
    """One line of live progress: state, current phase, step n/m (cached), elapsed."""
    parts = [str(status.get("state") or "?")]
    if status.get("phase"):
        parts.append(f"phase {status['phase']}")
    if status.get("attempt") and status["attempt"] > 1:
        parts.append(f"attempt {status['attempt']}")
    if steps is not None:
        done, total, cached = steps
        parts.append(f"step {done}/{total}" + (f" ({cached} cached)" if cached else ""))
    parts.append(f"{elapsed:.0f}s")
    return " · ".join(parts)


class StepCounter:
    """Steps done / total / cached, fed plain build log lines one by one (``#5 [2/3] RUN …``,
    ``#5 CACHED``, ``#5 DONE 0.1s``); :meth:`reset` at a new attempt."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.steps: set[str] = set()
        self.finished: set[str] = set()
        self.cached: set[str] = set()

    def feed(self, line: str) -> None:
        head, _, rest = line.partition(" ")
        if not head.startswith("#"):
            return
        if rest.startswith("[") and "/" in rest.split("]", 1)[0]:
            n, _, m = rest[1:].split("]", 1)[0].split(" ")[-1].partition("/")
            if n.isdigit() and m.isdigit():
                self.total = max(self.total, int(m))
                self.steps.add(head)
        elif head in self.steps and (rest.startswith("DONE") or rest == "CACHED"):
            self.finished.add(head)
            if rest == "CACHED":
                self.cached.add(head)

    def counts(self) -> tuple[int, int, int] | None:
        """(done, total, cached); None before the first numbered step."""
        return (len(self.finished), self.total, len(self.cached)) if self.total else None


def live_wait(
    status: Callable[[], dict[str, Any]],
    steps: Callable[[], tuple[int, int, int] | None],
    finished: Callable[[float], dict[str, Any] | None],
    console: Console,
    timeout: float | None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Show progress on ``console`` (rich Live, 2 refreshes a second) until ``finished(wait_s)``
    returns the record; TimeoutError after ``timeout`` seconds."""
    from rich.live import Live

    start = clock()
    with Live(console=console, transient=True, auto_refresh=False) as live:
        while True:
            elapsed = clock() - start
            if timeout is not None and elapsed >= timeout:
                raise TimeoutError(f"no result after {timeout}s")
            record = finished(0.5)
            if record is not None:
                return record
            live.update(Text(progress_line(status(), steps(), clock() - start)), refresh=True)
