"""Terminal views of a result record: a summary and a phase waterfall (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .contract.record import sentence

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


def render_record(record: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        import sys

        # piped output is read by programs and people alike: never cut digests at 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)
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
    cache = record.get("cache") or {}
    if cache.get("error"):  # the image may be pushed while its cache export failed (buildctl exit 0)
        summary.add_row("cache", f"[yellow]not exported[/]: {escape(cache['error'])}")
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
