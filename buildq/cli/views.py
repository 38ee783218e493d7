"""Terminal views: a result record (a summary and a phase waterfall), ``buildq list``, and
``submit --wait``'s live progress (pure text builders over data, plus rich tables and the Live
loop)."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..contract.status import epoch, sentence

#: timeline order of the phases in the waterfall
PHASE_ORDER = (
    "queued",
    "launch",
    "context",
    "cache_import",
    "build",
    "export_image",
    "push",
    "cache_export",
    "finalize",
    "other",
)
BAR_WIDTH = 40
#: the console width for a pipe: wide enough that nothing is ever wrapped
PIPE_WIDTH = 100_000


def attestation_kind(predicate_type: str) -> str:
    """``provenance`` / ``sbom`` for the predicate types BuildKit writes, else the type itself."""
    if "slsa.dev/provenance" in predicate_type:
        return "provenance"
    if "spdx.dev/Document" in predicate_type:
        return "sbom"
    return predicate_type


#: what ``buildq status`` says of a build the export lease kept from exporting
SKIPPED_EXPORTS = {
    "skipped_newer": "a newer build of the ref exports it",
    "skipped_busy": "an older build was still exporting the ref",
}


def waterfall_rows(phases: dict[str, float], width: int = BAR_WIDTH) -> list[tuple[str, float, int, int]]:
    """(phase, seconds, offset, length) in characters: phases laid end to end over ``width``."""
    total = phases.get("total") or sum(phases.get(p, 0.0) for p in PHASE_ORDER)
    rows = []
    elapsed = 0.0
    for name in PHASE_ORDER:
        seconds = phases.get(name, 0.0)
        if total > 0:
            offset = round(elapsed / total * width)
            end = round((elapsed + seconds) / total * width)
        else:
            offset = end = 0
        length = max(end - offset, 1 if seconds > 0 else 0)
        rows.append((name, seconds, min(offset, width - length) if length else offset, length))
        elapsed += seconds
    return rows


def explain_lines(explain: dict[str, Any] | None) -> list[str]:
    """The record's ``explain`` as printed under the waterfall: one line per flagged phase."""
    if not explain:
        return []
    flagged = explain.get("flagged") or []
    if not flagged:
        return [f"explain: {explain.get('summary')}"]
    return [f"unusually slow for {explain.get('key')}:", *(f"  {sentence(f)}" for f in flagged)]


def for_pipe(draw: Callable[[Console], None], out: TextIO) -> None:
    """What ``draw`` prints, for a pipe: never wrapped or cut (however long a digest or a tag), no
    colour, no trailing blanks (a table pads its cells to the column's width)."""
    buffer = io.StringIO()
    draw(Console(file=buffer, width=PIPE_WIDTH, soft_wrap=True, color_system=None, highlight=False))
    for line in buffer.getvalue().splitlines():
        out.write(line.rstrip() + "\n")


def render_record(record: dict[str, Any], console: Console | None = None) -> None:
    """A record as its terminal view (on stdout: for a pipe when it is not a terminal)."""
    if console is None:
        if not sys.stdout.isatty():
            for_pipe(lambda piped: render_record(record, piped), sys.stdout)
            return
        console = Console()
    state = record.get("state", "?")
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state, "cyan")
    summary = Table.grid(padding=(0, 2))
    summary.add_row("job", str(record.get("job_id")))
    summary.add_row("state", f"[{colour}]{state}[/]")
    if record.get("phase") and state not in ("succeeded", "failed", "cancelled"):
        summary.add_row("phase", str(record["phase"]))
    image = record.get("image") or {}
    if image.get("names"):
        summary.add_row("image", ", ".join(image["names"]))
    if image.get("digest"):
        summary.add_row("digest", image["digest"])
    for platform, digest in sorted((image.get("platforms") or {}).items()):
        summary.add_row(f"  {platform}", digest)
    for attestation in image.get("attestations") or []:
        kinds = (
            ", ".join(attestation_kind(t) for t in attestation.get("predicate_types") or []) or "attestation"
        )
        summary.add_row(
            f"  {kinds}",
            f"{attestation['digest']} (for {attestation.get('platform') or attestation['subject']})",
        )
    if image.get("registry_error"):
        summary.add_row("index", f"not read back: {image['registry_error']}")
    cache = record.get("cache") or {}
    if cache.get("error"):  # the image may be pushed while its cache export failed (buildctl exit 0)
        summary.add_row("cache", f"[yellow]not exported[/]: {escape(cache['error'])}")
    elif cache.get("export") in SKIPPED_EXPORTS:  # the ref's export lease (docs/cache-scopes.md)
        why = SKIPPED_EXPORTS[cache["export"]]
        summary.add_row("cache", f"not exported: {why} ({cache['export']}; {escape(str(cache.get('ref')))})")
    if record.get("superseded_by"):
        summary.add_row("superseded by", escape(str(record["superseded_by"])))
    if record.get("duration_s") is not None:
        summary.add_row("duration", f"{record['duration_s']:.3f}s")
    if record.get("daemon"):  # which daemon ran it and why (cache affinity, least loaded, fallback)
        routing = f" ({record['routing']})" if record.get("routing") else ""
        summary.add_row("daemon", f"{record['daemon']}{routing}")
    attempts = record.get("attempts") or []
    if attempts:
        summary.add_row(
            "attempts",
            ", ".join(
                f"#{a['number']} {a['outcome']}" + (f" ({a['reason']})" if a.get("reason") else "")
                for a in attempts
            ),
        )
    error = record.get("error")
    if error:
        summary.add_row("error", f"[red]{error.get('kind')}[/]: {error.get('message')}")
    console.print(summary)
    phases = record.get("phases")
    if phases:
        table = Table(title="phases", show_edge=False, box=None)
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        table.add_column("timeline")
        for name, seconds, offset, length in waterfall_rows(phases):
            table.add_row(name, f"{seconds:.3f}", " " * offset + "█" * length)
        table.add_row("total", f"{phases.get('total', 0.0):.3f}", "")
        console.print(table)
    for line in explain_lines(record.get("explain")):
        console.print(line, markup=False, highlight=False)
    steps = record.get("steps")
    if steps:
        console.print(
            f"steps: {steps.get('total')} total, {steps.get('cached')} cached, "
            f"{steps.get('executed')} executed"
            f" (cache hit {steps.get('cache_hit_ratio', 0):.0%})"
        )
    for step in record.get("slowest_steps") or []:
        console.print(
            f"  {step['seconds']:8.3f}s  {step['name']}" + ("  (cached)" if step.get("cached") else "")
        )
    tail = (error or {}).get("log_tail")
    if tail:
        console.print("[bold]last output of the failing step:[/]")
        for line in tail:
            console.print(f"  {line}", markup=False, highlight=False)


def ago(seconds: float | None) -> str:
    """``42s``, ``3m``, ``5h``, ``2d`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


LIST_COLUMNS = ("JOB", "STATE", "PHASE", "AGE", "DURATION", "IMAGE")


def list_lines(rows: list[dict[str, Any]], depths: Mapping[str, int], now: float) -> list[list[str]]:
    """The cells of ``buildq list``: job, state, phase, age, duration, image (one row per job)."""
    out = []
    for row in rows:
        enqueued = _epoch(row.get("enqueued_at"))
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


def _epoch(value: object) -> float | None:
    """An RFC 3339 time (or epoch seconds) as epoch seconds."""
    if isinstance(value, int | float):
        return float(value)
    try:
        return epoch(value) if isinstance(value, str) else None
    except ValueError:
        return None


def queued_line(depths: Mapping[str, int]) -> str:
    waiting = ", ".join(f"{queue} {n}" for queue, n in depths.items())
    return f"queued messages: {waiting if waiting else 'n/a (broker is not Redis)'}"


def render_list(rows: list[dict[str, Any]], depths: Mapping[str, int], now: float, console: Console) -> None:
    """``buildq list`` on a terminal: a table (the image column folds to the width)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in LIST_COLUMNS:
        table.add_column(name, no_wrap=name != "IMAGE", overflow="fold")
    for cells in list_lines(rows, depths, now):
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
    console.print(escape(queued_line(depths)))


def list_for_pipe(rows: list[dict[str, Any]], depths: Mapping[str, int], now: float) -> list[str]:
    """``buildq list`` for a pipe: one line per job, its cells separated by a tab (no padding, no
    wrapping: ``cut -f1`` gives the job ids), after a header line; the queues' line last."""
    lines = ["\t".join(LIST_COLUMNS)]
    lines += ["\t".join(" ".join(cell.split()) for cell in cells) for cells in list_lines(rows, depths, now)]
    return [*lines, queued_line(depths)]


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
