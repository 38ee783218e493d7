"""Render a ``--progress=rawjson`` stream as ``buildctl --progress=plain`` text, live.

:class:`PlainLogRenderer` follows BuildKit's plain printer (``util/progress/progressui/printer.go``):
``#N <name>`` headers, status lines ``#N <id> [<size>] [<secs>s] [done]``, step output
``#N 0.080 <text>`` (seconds since the vertex started), ``#N DONE 0.1s`` / ``CACHED`` / ``ERROR: ...``,
a blank line between blocks, ``#N ...`` when output switches away from an unfinished vertex, and the
``------`` error summary at the end. A vertex gets its number when it first prints.

Where buildctl's output depends on wall-clock timing, this renderer is deterministic instead:

- buildctl repaints at most every 100 ms, so short-lived open statuses are often never shown open.
  Here every update is rendered as it arrives: an open status line is printed when first seen (and
  again per BuildKit's 5 %/5 s rule, keyed by status id across vertices as BuildKit does), so the
  output holds every status line buildctl would print plus some open ones it coalesced away.
- Concurrent vertices are interleaved as soon as they have output (no 5 s anti-flicker split).
- Source vertices (no inputs) first report a sub-millisecond "cache request" interval and then start
  again for the real work; buildctl hides this only because both land in one repaint. Such a probe
  completion is held *tentatively*: it is merged if the vertex restarts, and printed when another
  vertex takes over the screen, when the stream clock passes it by 100 ms, or at :meth:`finish`.
- Partial output lines are buffered per vertex until their newline (or 16 KiB, or the vertex ends).

Memory is bounded per vertex: open statuses, a 50-line tail of output, and a partial-line buffer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .phases import Open as Interval
from .phases import union
from .progress import (
    CANCELED,
    TAIL_LINES,
    SolveStatus,
    Vertex,
    VertexStatus,
    b64decode_lenient,
    output_lines,
)

SUMMARY_LINES = 10  # BuildKit's logsBufferSize: output lines repeated in the error summary
PROBE_MAX_SECONDS = 0.005  # a source vertex's cache-request interval (captures: 27-200 us)
PROBE_WINDOW_SECONDS = 0.1  # BuildKit's plain repaint interval
_MIN_PROGRESS_DELTA = 0.05
_MIN_TIME_DELTA = 5.0
_LAST_STATUS_CAP = 1024
_MAX_OPEN_STATUSES = 256
_CANCELED = CANCELED
_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def format_bytes(n: int) -> str:
    """Size as BuildKit prints it (``units.Bytes`` with ``%.2f``): ``121B``, ``8.59MB``."""
    i, base = 0, 1
    while i < len(_UNITS) - 1 and abs(n) >= base * 1000:
        i, base = i + 1, base * 1000
    return f"{n}B" if i == 0 else f"{n / base:.2f}{_UNITS[i]}"


def status_line(index: int, s: VertexStatus) -> str:
    """``#N <id>[ <size>][ <secs>s][ done]`` for one status, as BuildKit's printer formats it."""
    size = ""
    if s.total:
        size = f" {format_bytes(s.current)} / {format_bytes(s.total)}"
    elif s.current:
        size = f" {format_bytes(s.current)}"
    end = s.completed if s.completed is not None else s.timestamp
    tm = ""
    if s.started is not None and end is not None and end - s.started > 0.01:
        tm = f" {end - s.started:.1f}s"
    if s.completed is not None:
        tm += " done"
    return f"#{index} {s.id}{size}{tm}"


def _log_offset(seconds: float) -> str:
    prec = 3 if seconds < 10 else 2 if seconds < 100 else 1
    return f"{seconds:.{prec}f}"


@dataclass(eq=False, slots=True)
class _Vtx:
    digest: str
    name: str
    has_inputs: bool = False
    cached: bool = False
    error: str | None = None
    index: int = 0  # 0 until first printed
    start_seq: int = 0  # order of first start, 0 until started
    intervals: dict[float, float | None] = field(default_factory=dict)
    folded: float = 0.0  # seconds of old intervals dropped to keep ``intervals`` small
    sig: tuple[object, ...] | None = None
    statuses: dict[str, VertexStatus] = field(default_factory=dict)  # started, not yet printed done
    status_updates: dict[str, None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)  # complete lines not yet printed
    partial: bytearray = field(default_factory=bytearray)
    partial_ts: str = "0.000"
    tail: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    tentative: bool = False
    last_output: int = 0

    def merged(self) -> list[Interval]:
        return union(self.intervals.items())

    def recent(self) -> Interval | None:
        merged = self.merged()
        return merged[-1] if merged else None

    def completed(self) -> bool:
        return (self.recent() or (0.0, None))[1] is not None

    def stop(self) -> float:
        return (self.recent() or (0.0, None))[1] or 0.0

    def final(self) -> bool:
        return self.completed() and not self.tentative

    def seconds(self, now: float) -> float:
        return self.folded + sum((now if b is None else b) - a for a, b in self.merged())


class _VertexBook:
    """The stream's vertices as the printer needs them: merged updates, output lines, statuses."""

    def __init__(
        self, redact: Callable[[str], str] | None = None, safe_cut: Callable[[bytes, int], int] | None = None
    ) -> None:
        self._redact = redact or (lambda text: text)
        #: where a line longer than MAX_PARTIAL_BYTES may be cut so no masked value spans the cut
        self._safe_cut = safe_cut
        self._vtx: dict[str, _Vtx] = {}
        self._current: _Vtx | None = None
        self._next_index = 0
        self._start_seq = 0
        self._output_seq = 0
        self._not_first = False
        self._now = 0.0  # stream clock: latest timestamp seen
        self._last_status: dict[str, tuple[float, int]] = {}

    def _tick(self, *times: float | None) -> None:
        for t in times:
            if t is not None and t > self._now:
                self._now = t

    def _apply_vertex(self, rec: Vertex, updated: dict[_Vtx, None]) -> None:
        self._tick(rec.started, rec.completed)
        vx = self._vtx.get(rec.digest)
        if vx is None:
            vx = self._vtx[rec.digest] = _Vtx(rec.digest, rec.name)
        vx.has_inputs = vx.has_inputs or bool(rec.inputs)
        if rec.started is None:
            if not vx.intervals:  # a repeated declaration never resets a started vertex
                vx.name, vx.cached, vx.error = rec.name, rec.cached, rec.error
            return
        sig = (rec.name, rec.started, rec.cached, rec.error)
        changed = vx.sig != sig or rec.completed is not None
        vx.sig = sig
        vx.name, vx.cached, vx.error = rec.name, rec.cached, rec.error
        if not vx.intervals:
            self._start_seq += 1
            vx.start_seq = self._start_seq
        vx.intervals[rec.started] = rec.completed
        if len(vx.intervals) > 16:
            merged = vx.merged()
            vx.folded += sum(b - a for a, b in merged[:-8] if b is not None)
            vx.intervals = dict(merged[-8:])
        probe = (
            len(vx.intervals) == 1
            and rec.completed is not None
            and rec.completed - rec.started < PROBE_MAX_SECONDS
            and not (rec.cached or rec.error or vx.has_inputs)
        )
        vx.tentative = probe and vx.completed()
        if changed:
            updated[vx] = None

    def _apply_status(self, st: VertexStatus, updated: dict[_Vtx, None]) -> None:
        vx = self._vtx.get(st.vertex)
        if vx is None or (st.started is None and st.id not in vx.statuses):
            return  # BuildKit only ever prints statuses that have started
        self._tick(st.timestamp, st.started, st.completed)
        vx.statuses[st.id] = st
        vx.status_updates[st.id] = None
        updated[vx] = None
        if len(vx.statuses) > _MAX_OPEN_STATUSES:  # a stream that never completes its statuses
            oldest = next(iter(vx.statuses))
            del vx.statuses[oldest]
            vx.status_updates.pop(oldest, None)

    def _apply_log(self, vx: _Vtx, data: bytes, timestamp: float | None) -> None:
        recent = vx.recent()
        ts = _log_offset(timestamp - recent[0] if timestamp is not None and recent else 0.0)
        if not vx.partial:
            vx.partial_ts = ts
        for line in output_lines(vx.partial, data, self._safe_cut):
            self._emit(vx, line)
            vx.partial_ts = ts  # the next line starts in this update

    def _flush_partial(self, vx: _Vtx) -> None:
        if vx.partial:
            line = bytes(vx.partial)
            vx.partial.clear()
            self._emit(vx, line)

    def _emit(self, vx: _Vtx, line: bytes) -> None:
        text = self._redact(line.decode("utf-8", errors="replace"))
        vx.lines.append((vx.partial_ts, text))
        vx.tail.append((vx.partial_ts, text))
        self._output_seq += 1
        vx.last_output = self._output_seq

    # -- inspection ----------------------------------------------------------------------------
    def failing_tail(self, n: int = 30) -> list[str]:
        """Last n (at most 50) output lines of the errored vertex, else of the last vertex with output."""
        with_output = [v for v in self._vtx.values() if v.tail or v.partial]
        failed = [v for v in with_output if v.error and not v.error.endswith(_CANCELED)]
        pool = failed or with_output
        if not pool or n <= 0:
            return []
        vx = max(pool, key=lambda v: v.last_output)
        lines = [text for _, text in vx.tail]
        if vx.partial:
            lines.append(self._redact(vx.partial.decode("utf-8", errors="replace")))
        return lines[-n:]


class PlainLogRenderer(_VertexBook):
    """Feed SolveStatus updates in stream order; each call returns the plain lines printable now."""

    def feed(self, status: SolveStatus) -> list[str]:
        """Apply one update; return the lines it makes printable (never held for the end)."""
        updated: dict[_Vtx, None] = {}
        for vertex in status.vertexes:
            self._apply_vertex(vertex, updated)
        for st in status.statuses:
            self._apply_status(st, updated)
        for warning in status.warnings:
            vx = self._vtx.get(warning.vertex)
            if vx is not None:
                vx.warnings.append(b64decode_lenient(warning.short_b64).decode("utf-8", errors="replace"))
                updated[vx] = None
        for log in status.logs:
            vx = self._vtx.get(log.vertex)
            if vx is not None:
                self._tick(log.timestamp)
                self._apply_log(vx, b64decode_lenient(log.data_b64), log.timestamp)
                updated[vx] = None
        for vx in self._vtx.values():
            if vx.tentative and self._now >= vx.stop() + PROBE_WINDOW_SECONDS:
                vx.tentative = False
                updated[vx] = None
        out: list[str] = []
        self._print(updated, out, activate=True)
        return out

    def end(self, tail_lines: int = 30) -> tuple[list[str], list[str]]:
        """:meth:`finish`'s lines and then :meth:`failing_tail` (``tail_lines``), at once."""
        return self.finish(), self.failing_tail(tail_lines)

    def finish(self) -> list[str]:
        """Flush what is pending (tentative completions, partial lines), then the error summary. Once."""
        updated: dict[_Vtx, None] = {}
        for vx in self._vtx.values():
            if vx.tentative or vx.partial:
                vx.tentative = False
                self._flush_partial(vx)
                updated[vx] = None
        out: list[str] = []
        self._print(updated, out, activate=False)
        for vx in sorted((v for v in self._vtx.values() if v.start_seq), key=lambda v: v.start_seq):
            if vx.error and not vx.error.endswith(_CANCELED):
                out += ["------", self._redact(f" > {vx.name}:")]
                out += [f"{ts} {text}" for ts, text in list(vx.tail)[-SUMMARY_LINES:]]
                out.append("------")
        return out

    # -- output --------------------------------------------------------------------------------
    def _print(self, updated: dict[_Vtx, None], out: list[str], activate: bool) -> None:
        done = [vx for vx in updated if vx.final()]
        current = self._current
        if current is not None and current in done:
            self._print_vtx(current, out)
        for vx in sorted(done, key=_Vtx.stop):
            if vx is not current:
                self._print_vtx(vx, out)
        rest = [vx for vx in updated if not vx.final()]
        rest.sort(key=lambda v: v is not self._current)
        for vx in rest:
            self._print_vtx(vx, out, optional=True)
        if activate and self._current is None:
            waiting = [v for v in self._vtx.values() if v.intervals and not v.completed()]
            if waiting:
                self._print_vtx(min(waiting, key=lambda v: v.start_seq), out)

    def _print_vtx(self, vx: _Vtx, out: list[str], optional: bool = False) -> None:
        """One printVtx: header on switch, new statuses, warnings, output lines, end marker."""
        if vx.final():
            self._flush_partial(vx)
        if optional and not self._body(vx, dry=True)[0]:
            # nothing to show: keep the screen for the active vertex; a vertex finalised earlier in
            # this repaint (a tentative probe) has already printed its marker
            if vx.tentative or vx.final() or self._current not in (None, vx):
                return
        body, open_status = self._body(vx, dry=False)
        if vx.index == 0:
            self._next_index += 1
            vx.index = self._next_index
        if vx is not self._current:
            current = self._current
            if current is not None and current.tentative:
                current.tentative = False
                self._print_vtx(current, out)
            elif current is not None:
                out.append(f"#{current.index} ...")
            if self._not_first:
                out.append("")
            self._not_first = True
            out.append(self._redact(f"#{vx.index} {vx.name}"))
        out += body
        self._current = vx
        if vx.final() and not open_status:
            self._current = None
            if vx.error:
                cancelled = vx.error.endswith(_CANCELED)
                out.append(
                    f"#{vx.index} CANCELED" if cancelled else self._redact(f"#{vx.index} ERROR: {vx.error}")
                )
            elif vx.cached:
                out.append(f"#{vx.index} CACHED")
            else:
                out.append(f"#{vx.index} DONE {vx.seconds(self._now):.1f}s")

    def _body(self, vx: _Vtx, dry: bool) -> tuple[list[str], bool]:
        index = vx.index or self._next_index + 1
        body: list[str] = []
        open_status = False
        for sid, st in vx.statuses.items():  # in order of first start, as BuildKit's printer
            if sid not in vx.status_updates:
                continue
            last = self._last_status.get(sid)
            if last is not None and st.completed is None:
                delta = (st.current - last[1]) / st.total if st.total > 0 else 0.0
                if delta < _MIN_PROGRESS_DELTA and (st.timestamp or 0.0) - last[0] < _MIN_TIME_DELTA:
                    continue
            body.append(self._redact(status_line(index, st)))
            open_status = open_status or st.completed is None
            if not dry:
                self._remember_status(sid, st)
        body += [self._redact(f"#{index} WARN: {w}") for w in vx.warnings]
        body += [f"#{index} {ts} {text}" for ts, text in vx.lines]
        if not dry:
            vx.statuses = {k: s for k, s in vx.statuses.items() if s.completed is None}
            vx.status_updates.clear()
            vx.warnings.clear()
            vx.lines.clear()
        return body, open_status

    def _remember_status(self, sid: str, st: VertexStatus) -> None:
        self._last_status.pop(sid, None)
        self._last_status[sid] = (st.timestamp or 0.0, st.current)
        if len(self._last_status) > _LAST_STATUS_CAP:
            cutoff = self._now - _MIN_TIME_DELTA
            self._last_status = {k: v for k, v in self._last_status.items() if v[0] >= cutoff}
            while len(self._last_status) > _LAST_STATUS_CAP:
                del self._last_status[next(iter(self._last_status))]
