"""Streaming reader of a ``buildctl --progress=rawjson`` stderr stream.

:class:`ProgressTracker` is fed one stderr line at a time and keeps a table of vertices merged by
digest (name, inputs, first ``started``, last ``completed``, the [started, completed] runs of the
vertex, cached flag, error), the statuses of each vertex merged by status id, counters of log bytes
and warnings, and the last few non-JSON lines (the final ``error: ...`` line is among them).

Promises:

* Memory is bounded by the number of distinct vertices and statuses, never by the stream length:
  no line is kept except the last :data:`TEXT_LINES_KEPT` non-JSON ones, log data is only counted,
  and each vertex keeps at most :data:`MAX_RUNS` runs (overlapping/adjacent runs are merged; past
  the limit the two runs with the smallest gap between them are merged into one).
* Any line is accepted: lines that are not SolveStatus objects are kept as text, never raise.
* Timestamps are the daemon's (float epoch seconds); ``first_output_at`` is the worker's clock
  (the injected ``clock``) when the first line arrived. :mod:`buildq.buildkit.phases` maps the
  former onto the latter.

:class:`OutputTails` keeps what a failed build's record quotes: each step's last output lines
(redacted), split into lines as the plain printer splits them (:func:`output_lines`, shared with
:mod:`buildq.buildkit.plainlog`), bounded per vertex.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MAX_RUNS = 8
TEXT_LINES_KEPT = 20

# A run of a vertex: (started, completed); completed is None while it is still running.
Run = tuple[float, float | None]


@dataclass(slots=True)
class StatusState:
    """One status of a vertex merged by id: first ``started``, last ``completed``/``timestamp``."""

    id: str
    name: str = ""
    started: float | None = None
    completed: float | None = None
    timestamp: float | None = None
    current: int = 0
    total: int = 0


@dataclass(slots=True)
class VertexState:
    """One vertex merged by digest. ``runs`` is sorted, disjoint and at most MAX_RUNS long."""

    digest: str
    name: str = ""
    inputs: tuple[str, ...] = ()
    started: float | None = None
    completed: float | None = None
    runs: list[Run] = field(default_factory=list)
    cached: bool = False
    error: str | None = None
    statuses: dict[str, StatusState] = field(default_factory=dict)
    log_bytes: int = 0
    log_chunks: int = 0
    warnings: int = 0


def base64_decoded_len(data: str) -> int:
    """Length in bytes of the decoded form of standard base64 ``data``, without decoding it."""
    n = len(data)
    if n == 0:
        return 0
    pad = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    return max(0, n * 3 // 4 - pad)


def normalize_runs(runs: Iterable[Run], limit: int = MAX_RUNS) -> list[Run]:
    """Sort runs, merge overlapping/adjacent ones, then merge closest pairs until ``limit`` remain.

    Open runs (end None): an open run reaches up to the next run and takes its end (a vertex
    started again must have stopped before); an open run starting strictly inside a completed one
    is closed by it (that completion is later news); one starting exactly at a completion stays open.
    """
    merged: list[Run] = []
    for start, end in sorted(runs, key=lambda r: r[0]):
        if merged:
            last_start, last_end = merged[-1]
            if last_end is None:
                merged[-1] = (last_start, end)
                continue
            if start < last_end or (start == last_end and end is not None):
                merged[-1] = (last_start, last_end if end is None else max(last_end, end))
                continue
            if start == last_end:
                merged[-1] = (last_start, None)
                continue
        merged.append((start, end))
    while len(merged) > max(1, limit):
        # All runs but the last are closed here (an open run would have absorbed its successor).
        gaps = [merged[i + 1][0] - (merged[i][1] or merged[i][0]) for i in range(len(merged) - 1)]
        i = gaps.index(min(gaps))
        merged[i : i + 2] = [(merged[i][0], merged[i + 1][1])]
    return merged


def add_run(runs: list[Run], started: float, completed: float | None) -> list[Run]:
    """Record that a vertex ran from ``started`` (to ``completed`` if given); returns new runs."""
    if not runs or (len(runs) < MAX_RUNS and runs[-1][1] is not None and started > runs[-1][1]):
        if completed is None or completed >= started:
            runs.append((started, completed))
            return runs
    for i, (start, end) in enumerate(runs):
        if start == started:
            if completed is not None:
                runs[i] = (start, completed if end is None else max(end, completed))
                return normalize_runs(runs)
            return runs
        if start <= started and (end is None or started <= end):
            if completed is not None and end is not None and completed > end:
                runs[i] = (start, completed)
                return normalize_runs(runs)
            return runs
    runs.append((started, completed))
    return normalize_runs(runs)


class ProgressTracker:
    """Fold a rawjson progress stream, line by line, into a bounded vertex table.

    ``vertices`` maps digest to :class:`VertexState`. ``first_output_at``/``last_output_at`` are
    ``clock()`` at the first/last line fed. ``first_timestamp`` is the earliest daemon time in the
    first line carrying any (the stream's start; a vertex shared with an older build cannot pull it
    back), ``last_timestamp`` the latest daemon time seen. ``error_line`` is the last line starting
    with ``error: ``, without that prefix; ``text_lines`` the last non-JSON lines.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.vertices: dict[str, VertexState] = {}
        self.lines = 0
        self.json_lines = 0
        self.warnings = 0
        self.first_output_at: float | None = None
        self.last_output_at: float | None = None
        self.first_timestamp: float | None = None
        self.last_timestamp: float | None = None
        self.error_line: str | None = None
        self._text: deque[str] = deque(maxlen=TEXT_LINES_KEPT)

    @property
    def text_lines(self) -> tuple[str, ...]:
        """The last TEXT_LINES_KEPT non-JSON lines, oldest first."""
        return tuple(self._text)

    def feed(self, line: str) -> SolveStatus | None:
        """Take one stderr line; return its SolveStatus, or None for a non-JSON line."""
        now = self._clock()
        if self.first_output_at is None:
            self.first_output_at = now
        self.last_output_at = now
        self.lines += 1
        status = parse_line(line)
        if status is None:
            text = line.rstrip("\r\n")
            if text.strip():
                self._text.append(text)
                if text.startswith(ERROR_PREFIX):
                    self.error_line = text[len(ERROR_PREFIX) :]
            return None
        self.json_lines += 1
        self._apply(status)
        return status

    def vertex_errors(self) -> list[str]:
        """The errors the stream reported on vertices, in the order the vertices appeared."""
        return [v.error for v in self.vertices.values() if v.error]

    def _vertex(self, digest: str) -> VertexState:
        state = self.vertices.get(digest)
        if state is None:
            state = self.vertices[digest] = VertexState(digest=digest)
        return state

    def _apply(self, status: SolveStatus) -> None:
        stamps: list[float] = []
        for v in status.vertexes:
            self._merge_vertex(v, stamps)
        for s in status.statuses:
            self._merge_status(s, stamps)
        for log in status.logs:
            state = self._vertex(log.vertex)
            state.log_bytes += base64_decoded_len(log.data_b64)
            state.log_chunks += 1
            if log.timestamp is not None:
                stamps.append(log.timestamp)
        for w in status.warnings:
            self._vertex(w.vertex).warnings += 1
            self.warnings += 1
        if stamps:
            low, high = min(stamps), max(stamps)
            if self.first_timestamp is None:
                self.first_timestamp = low
            if self.last_timestamp is None or high > self.last_timestamp:
                self.last_timestamp = high

    def _merge_vertex(self, v: Vertex, stamps: list[float]) -> None:
        state = self._vertex(v.digest)
        if v.name:
            state.name = v.name
        if v.inputs:
            state.inputs = v.inputs
        state.cached = state.cached or v.cached
        if v.error:
            state.error = v.error
        if v.started is not None:
            stamps.append(v.started)
            if state.started is None or v.started < state.started:
                state.started = v.started
            state.runs = add_run(state.runs, v.started, v.completed)
        if v.completed is not None:
            stamps.append(v.completed)
            if state.completed is None or v.completed > state.completed:
                state.completed = v.completed

    def _merge_status(self, s: VertexStatus, stamps: list[float]) -> None:
        statuses = self._vertex(s.vertex).statuses
        st = statuses.get(s.id)
        if st is None:
            st = statuses[s.id] = StatusState(id=s.id)
        if s.name:
            st.name = s.name
        st.current = s.current
        if s.total:
            st.total = s.total
        if s.started is not None:
            stamps.append(s.started)
            if st.started is None or s.started < st.started:
                st.started = s.started
        if s.completed is not None:
            stamps.append(s.completed)
            if st.completed is None or s.completed > st.completed:
                st.completed = s.completed
        if s.timestamp is not None:
            stamps.append(s.timestamp)
            if st.timestamp is None or s.timestamp > st.timestamp:
                st.timestamp = s.timestamp


# ----------------------------------------------------------------------------------------------
# One ``--progress=rawjson`` line parsed into plain data (BuildKit's ``client.SolveStatus``).
#
# buildctl writes one JSON object per line to stderr:
# ``{"vertexes":[...],"statuses":[...],"logs":[...],"warnings":[...]}``; any key may be absent,
# and a vertex is repeated in later lines as it changes (merge by digest downstream). Timestamps
# are RFC 3339 with nanoseconds; they are parsed to float seconds since the epoch. Log ``data``
# is base64 and stays encoded here (decode where it is used).
#
# :func:`parse_line` never raises: a line that is not a SolveStatus object (the final
# ``error: ...`` line, ``Dockerfile:3`` context lines, logrus lines) returns ``None``.
#: buildctl's last line on failure is ``error: <message>`` (plain text after the JSON lines)
ERROR_PREFIX = "error: "


def b64decode_lenient(data: str) -> bytes:
    """Decode a base64 payload (log data, warnings); text that is not base64 comes back as UTF-8."""
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        return data.encode("utf-8", errors="replace")


def parse_time(value: Any) -> float | None:
    """RFC 3339 (nanoseconds allowed) → epoch seconds; None for absent or unparseable values."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Vertex:
    digest: str
    name: str
    inputs: tuple[str, ...] = ()
    started: float | None = None
    completed: float | None = None
    cached: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VertexStatus:
    id: str
    vertex: str
    name: str = ""
    current: int = 0
    total: int = 0
    timestamp: float | None = None
    started: float | None = None
    completed: float | None = None


@dataclass(frozen=True, slots=True)
class VertexLog:
    vertex: str
    stream: int
    data_b64: str
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class VertexWarning:
    vertex: str
    level: int
    short_b64: str
    url: str | None = None


@dataclass(frozen=True, slots=True)
class SolveStatus:
    vertexes: tuple[Vertex, ...] = ()
    statuses: tuple[VertexStatus, ...] = ()
    logs: tuple[VertexLog, ...] = ()
    warnings: tuple[VertexWarning, ...] = ()


def _text(value: Any) -> str | None:
    """A string field: None when absent or empty, any other JSON value as its text."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _vertex(d: dict[str, Any]) -> Vertex:
    return Vertex(
        digest=str(d.get("digest", "")),
        name=str(d.get("name", "")),
        inputs=tuple(d.get("inputs") or ()),
        started=parse_time(d.get("started")),
        completed=parse_time(d.get("completed")),
        cached=bool(d.get("cached", False)),
        error=_text(d.get("error")),
    )


def _status(d: dict[str, Any]) -> VertexStatus:
    return VertexStatus(
        id=str(d.get("id", "")),
        vertex=str(d.get("vertex", "")),
        name=str(d.get("name", "")),
        current=int(d.get("current") or 0),
        total=int(d.get("total") or 0),
        timestamp=parse_time(d.get("timestamp")),
        started=parse_time(d.get("started")),
        completed=parse_time(d.get("completed")),
    )


def _log(d: dict[str, Any]) -> VertexLog:
    return VertexLog(
        vertex=str(d.get("vertex", "")),
        stream=int(d.get("stream") or 0),
        data_b64=str(d.get("data") or ""),
        timestamp=parse_time(d.get("timestamp")),
    )


def _warning(d: dict[str, Any]) -> VertexWarning:
    return VertexWarning(
        vertex=str(d.get("vertex", "")),
        level=int(d.get("level") or 0),
        short_b64=str(d.get("short") or ""),
        url=d.get("url") or None,
    )


def parse_line(line: str) -> SolveStatus | None:
    """Parse one stderr line; ``None`` when it is not a SolveStatus JSON object."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if not isinstance(obj, dict):
        return None
    try:
        return SolveStatus(
            vertexes=tuple(_vertex(v) for v in obj.get("vertexes") or () if isinstance(v, dict)),
            statuses=tuple(_status(s) for s in obj.get("statuses") or () if isinstance(s, dict)),
            logs=tuple(_log(entry) for entry in obj.get("logs") or () if isinstance(entry, dict)),
            warnings=tuple(_warning(w) for w in obj.get("warnings") or () if isinstance(w, dict)),
        )
    except (TypeError, ValueError):
        return None


# -- output tails ------------------------------------------------------------------------------
#: an output line longer than this is cut there (a step printing without newlines stays bounded)
MAX_PARTIAL_BYTES = 16 * 1024
#: output lines kept per vertex
TAIL_LINES = 50
#: the error of a vertex that was only cancelled (another step failed)
CANCELED = "context canceled"


def utf8_cut(data: bytes | bytearray, limit: int) -> int:
    """Largest cut <= limit that does not split a UTF-8 sequence (falls back to limit)."""
    for cut in range(limit, max(limit - 4, 0), -1):
        if data[cut] & 0xC0 != 0x80:
            return cut
    return limit


def output_lines(
    partial: bytearray, data: bytes, safe_cut: Callable[[bytes, int], int] | None = None
) -> Iterator[bytes]:
    """The output lines ``data`` completes, continuing the unterminated line in ``partial`` (what
    is left unterminated stays there for the next call). A line ends at a newline (an empty one
    too), or is cut at :data:`MAX_PARTIAL_BYTES` — never inside a UTF-8 sequence, nor where
    ``safe_cut`` says a masked value would span the cut. Each is yielded as it completes."""
    while data:
        newline = data.find(b"\n")
        partial += data if newline < 0 else data[:newline]
        data = b"" if newline < 0 else data[newline + 1 :]
        while len(partial) > MAX_PARTIAL_BYTES:  # bound every line, complete or not
            keep = utf8_cut(partial, MAX_PARTIAL_BYTES)
            if safe_cut is not None:
                keep = safe_cut(bytes(partial), keep)
            line = bytes(partial[:keep])
            del partial[:keep]
            if line:
                yield line
        if newline >= 0:
            line = bytes(partial)
            partial.clear()
            yield line


@dataclass(eq=False, slots=True)
class _Tail:
    error: str | None = None
    started: bool = False
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    partial: bytearray = field(default_factory=bytearray)
    last_output: int = 0


class OutputTails:
    """Each vertex's last :data:`TAIL_LINES` output lines, redacted, and its error: what a failed
    build's record quotes (:meth:`failing_tail`), the same lines the plain view's renderer
    (:class:`~buildq.buildkit.plainlog.PlainLogRenderer`) ends with, without rendering anything.
    Memory is bounded per vertex (the tail and one partial line)."""

    def __init__(
        self, redact: Callable[[str], str] | None = None, safe_cut: Callable[[bytes, int], int] | None = None
    ) -> None:
        self._redact = redact or (lambda text: text)
        self._safe_cut = safe_cut
        self._tails: dict[str, _Tail] = {}
        self._seq = 0

    def feed(self, status: SolveStatus) -> None:
        for rec in status.vertexes:
            tail = self._tails.get(rec.digest)
            if tail is None:
                tail = self._tails[rec.digest] = _Tail()
            if rec.started is None:
                if not tail.started:  # a repeated declaration never resets a started vertex
                    tail.error = rec.error
                continue
            tail.started, tail.error = True, rec.error
        for log in status.logs:
            tail = self._tails.get(log.vertex)
            if tail is not None:
                for line in output_lines(tail.partial, b64decode_lenient(log.data_b64), self._safe_cut):
                    self._keep(tail, line)

    def failing_tail(self, n: int = 30) -> list[str]:
        """At the stream's end: the last ``n`` (at most 50) output lines of the errored vertex, else
        of the last vertex with output (an unterminated last line counts, as the plain view ends it)."""
        for tail in self._tails.values():
            if tail.partial:
                line = bytes(tail.partial)
                tail.partial.clear()
                self._keep(tail, line)
        with_output = [t for t in self._tails.values() if t.lines]
        failed = [t for t in with_output if t.error and not t.error.endswith(CANCELED)]
        pool = failed or with_output
        if not pool or n <= 0:
            return []
        return list(max(pool, key=lambda t: t.last_output).lines)[-n:]

    def _keep(self, tail: _Tail, line: bytes) -> None:
        tail.lines.append(self._redact(line.decode("utf-8", errors="replace")))
        self._seq += 1
        tail.last_output = self._seq
