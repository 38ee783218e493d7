"""The log of one running attempt: redacted and written to the job's stream as it happens.

:class:`AttemptLog` is what the worker feeds from the stderr reader thread: ``feed`` only redacts
and buffers (each line is stored once, raw; the plain view is rendered when read, and the worker's
own renderer only keeps the failing step's tail for the record); the process's scheduler calls
:meth:`AttemptLog.flush` every :data:`~buildq.store.logs.FLUSH_EVERY_S`, which writes the buffer as
one stream entry (:class:`~buildq.store.logs.LogStore`) and counts, never raises, Redis errors.
The end of the log goes with the result (:meth:`AttemptLog.ending`) or, before a retry, is written
at once (:meth:`AttemptLog.close`). With an archive, everything the attempt stored is also kept
compressed in memory (:meth:`AttemptLog.archived`) for the worker to archive when it ends.
:class:`RawRedactor` masks secrets in the rawjson lines. ``BUILDQ_LOG_MAX_BYTES`` caps what one
attempt stores (:meth:`AttemptLog.feed`): past it, one mark says the log was cut, the rest is
counted, and the log's end says how much was dropped.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..buildkit.progress import MAX_PARTIAL_BYTES, OutputTails, SolveStatus, b64decode_lenient, parse_line
from ..store.archive import GzipLines
from ..store.logs import FINAL_PREFIX, Entry, LogStore
from .redact import Redactor

# -- raw lines ---------------------------------------------------------------------------------
_KEEP = frozenset({"digest", "vertex", "inputs", "started", "completed", "timestamp"})  # ids and times
_B64 = frozenset({"data", "short", "detail"})  # base64 payloads: redacted decoded


class RawRedactor:
    """Redact rawjson lines: every string field, and base64 payloads decoded, redacted, re-encoded.

    Step output is redacted per output line, as the plain renderer does: the unterminated end of a
    ``logs`` entry is held per (vertex, stream) and sent, with its own timestamp, in front of the
    entry that completes the line (the held entry is stored with empty data, so its timestamp still
    counts). A secret split across entries, or at any base64 alignment, is therefore masked, and the
    stored raw lines replay through ``PlainLogRenderer`` to the stored plain lines. Held output is
    released when its vertex completes, past ``MAX_PARTIAL_BYTES``, or by :meth:`finish`.
    Lines that need no change are returned verbatim.
    """

    def __init__(self, redact: Callable[[str], str], cut: Callable[[bytes, int], int] | None = None) -> None:
        self._redact = redact
        #: where held output past MAX_PARTIAL_BYTES may be cut (:meth:`Redactor.safe_cut`): a secret
        #: across the cut is held back whole, never masked piece by piece
        self._cut = cut or (lambda data, at: at)
        self._held: dict[tuple[str, Any], tuple[dict[str, Any], bytearray]] = {}

    def line(self, line: str) -> list[str]:
        """The redacted form of one stderr line: usually one line, two when held output goes first."""
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return [self._redact(line)]
        out: list[str] = []
        vertexes = obj.get("vertexes") or ()
        done = {v.get("digest") for v in vertexes if isinstance(v, dict) and v.get("completed")}
        released = [self._release(key) for key in list(self._held) if key[0] in done]
        if released:
            out.append(_dumps({"logs": released}))
        new = {k: self._walk(v, k) for k, v in obj.items() if k != "logs"}
        if "logs" in obj:
            logs = obj["logs"]
            new["logs"] = [e for entry in logs for e in self._log(entry)] if isinstance(logs, list) else logs
        out.append(line if new == obj else _dumps(new))
        return out

    def finish(self) -> list[str]:
        """Held output of every vertex, as one line (none when nothing is held)."""
        released = [self._release(key) for key in list(self._held)]
        return [_dumps({"logs": released})] if released else []

    def _walk(self, value: Any, key: str | None) -> Any:
        if isinstance(value, str):
            if key in _KEEP:
                return value
            return self._redact_b64(value) if key in _B64 else self._redact(value)
        if isinstance(value, list):
            return [self._walk(v, key) for v in value]
        if isinstance(value, dict):
            return {k: self._walk(v, k) for k, v in value.items()}
        return value

    def _redact_b64(self, data: str) -> str:
        text = b64decode_lenient(data).decode("utf-8", errors="surrogateescape")
        masked = self._redact(text)
        return data if masked == text else _b64encode(masked)

    def _with(self, entry: dict[str, Any], data: bytes | bytearray) -> dict[str, Any]:
        return {**entry, "data": _b64encode(self._redact(bytes(data).decode("utf-8", "surrogateescape")))}

    def _release(self, key: tuple[str, Any]) -> dict[str, Any]:
        first, buf = self._held.pop(key)
        return self._with(first, buf)

    def _log(self, entry: Any) -> list[Any]:
        if not isinstance(entry, dict):
            return [entry]
        entry = {k: (v if k == "data" else self._walk(v, k)) for k, v in entry.items()}
        key = (str(entry.get("vertex", "")), entry.get("stream"))
        data = b64decode_lenient(str(entry.get("data") or ""))
        held = self._held.pop(key, None)
        first, buf = held if held else (entry, bytearray())
        buf += data
        cut = buf.rfind(b"\n")
        if cut < 0:
            if len(buf) > MAX_PARTIAL_BYTES:
                at = self._cut(bytes(buf), len(buf))
                if at < len(buf):  # the rest (a secret's possible start) waits for what follows
                    self._held[key] = (entry, bytearray(buf[at:]))
                    return [self._with(first, buf[:at])]
                tick = [] if held is None else [self._with(entry, b"")]  # keeps this entry's timestamp
                return [self._with(first, buf), *tick]
            self._held[key] = (first, buf)
            return [self._with(entry, b"")]
        out, start = [], 0
        if held is not None:  # the held start of a line, completed here: stamped with its own time
            start = buf.find(b"\n") + 1
            out.append(self._with(first, buf[:start]))
        if cut + 1 > start:
            out.append(self._with(entry, buf[start : cut + 1]))
        if cut + 1 < len(buf):
            self._held[key] = (entry, bytearray(buf[cut + 1 :]))
        return out


def _b64encode(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# -- one attempt -------------------------------------------------------------------------------
_PARSE: Any = object()


class _Lines:
    """One attempt's stderr lines as log entries: plain text, redacted raw lines, marks."""

    def __init__(self, attempt: int, redactor: Redactor | None) -> None:
        self.attempt = attempt
        self.redact: Callable[[str], str] = redactor.redact if redactor is not None else (lambda text: text)
        self.tails = OutputTails(
            redact=redactor.redact if redactor is not None else None,
            safe_cut=redactor.safe_cut if redactor is not None else None,
        )
        self.raw = RawRedactor(redactor.redact, redactor.safe_cut) if redactor is not None else None

    def entries(self, line: str, status: SolveStatus | None) -> list[Entry]:
        a = self.attempt
        if status is None:  # buildctl's own text (error line, Dockerfile excerpt)
            return [(a, "raw", self.redact(line))]
        raw = self.raw.line(line) if self.raw is not None else [line]
        self.tails.feed(status)  # for the failing step's tail only: plain is rendered when read
        return [(a, "raw", r) for r in raw]

    def finish(self) -> tuple[list[Entry], list[str]]:
        """What the end of the stream still holds (held output), and the failing step's last 30
        output lines."""
        raw = self.raw.finish() if self.raw is not None else []
        return [(self.attempt, "raw", r) for r in raw], self.tails.failing_tail(30)

    def mark(self, text: str, *, closes: bool = False) -> Entry:
        """A mark line; ``closes``: the one that closes the attempt (its log ends there)."""
        return (self.attempt, "end" if closes else "mark", self.redact(text))


class AttemptLog:
    """The log of one attempt: ``feed`` every stderr line (cheap, no I/O), ``flush`` now and then
    (the scheduler's thread), then ``ending`` or ``close`` once.

    Write failures are counted (``failed_flushes``, ``dropped``), never raised. When Redis falls
    behind, at most ``max_buffered`` (default: the stream's ``maxlen``) entries wait; older ones are
    dropped (and counted), as MAXLEN would trim them anyway. Thread-safe.
    """

    def __init__(
        self,
        store: LogStore,
        job_id: str,
        attempt: int,
        *,
        redactor: Redactor | None = None,
        max_buffered: int | None = None,
        archive: bool = False,
        max_bytes: int = 0,
    ) -> None:
        self.store, self.job_id, self.attempt = store, job_id, attempt
        #: everything stored, compressed, for the archive (None without one)
        self._gz = GzipLines() if archive else None
        #: a batch reached the stream (its TTL is set)
        self.written = False
        self._lines = _Lines(attempt, redactor)
        self._max_buffered = max(max_buffered or store.maxlen, 1)
        self._lock = threading.Lock()
        self._buffer: deque[Entry] = deque(maxlen=self._max_buffered)
        self._closed = False
        # flushes: batches written (one round trip each); dropped: lost to Redis errors or a full buffer
        self.lines_fed = self.flushes = self.failed_flushes = self.dropped = self.feed_errors = 0
        #: ``BUILDQ_LOG_MAX_BYTES``: output bytes kept for this attempt (0: no cap); past it, one
        #: mark says the log was cut, and the rest is only counted (``cut_bytes``, ``cut_lines``)
        self.max_bytes = max_bytes
        self.kept_bytes = self.cut_bytes = self.cut_lines = 0

    def feed(self, line: str, status: SolveStatus | None = _PARSE) -> None:
        """Render, redact and buffer one stderr line; pass ``status`` when already parsed (None: text)."""
        with self._lock:
            if self._closed:
                return
            self.lines_fed += 1
            try:
                entries = self._lines.entries(line, parse_line(line) if status is _PARSE else status)
            except Exception:  # a malformed line must not break the build
                self.feed_errors += 1
                return
            self._buffer_all(self._within_cap(entries))

    def _within_cap(self, entries: list[Entry]) -> list[Entry]:
        """The entries that fit under ``max_bytes`` (caller holds the lock); the first one past it
        is replaced by the mark that says the log is cut, the rest are counted."""
        if not self.max_bytes:
            return entries
        kept: list[Entry] = []
        for entry in entries:
            size = len(entry[2].encode("utf-8", "surrogateescape"))
            if not self.cut_bytes and self.kept_bytes + size <= self.max_bytes:
                self.kept_bytes += size
                kept.append(entry)
                continue
            if not self.cut_bytes:
                kept.append(self._lines.mark(
                    f"log cut: this attempt's output passed {self.max_bytes} bytes (BUILDQ_LOG_MAX_BYTES); "
                    "the rest is not kept"
                ))  # fmt: skip
            self.cut_bytes += size
            self.cut_lines += 1
        return kept

    def _cut_note(self) -> list[Entry]:
        """The mark saying how much output the cap dropped (caller holds the lock; none if nothing)."""
        if not self.cut_bytes:
            return []
        return [self._lines.mark(f"log cut: {self.cut_bytes} bytes in {self.cut_lines} lines not kept")]

    def mark(self, text: str) -> None:
        """Buffer a ``mark`` line (attempt started, retrying); written in order with the lines."""
        with self._lock:
            self._buffer_all([self._lines.mark(text)])

    def flush(self) -> None:
        """Write what is buffered (one round trip; nothing when empty)."""
        with self._lock:
            batch, self._buffer = self._buffer, deque(maxlen=self._max_buffered)
        self._write(batch)

    def ending(self, final_state: str) -> tuple[list[Entry], list[str]]:
        """Close the log: the entries not written yet (held output, then the ``final: <state>``
        mark that closes it), to be stored with the result, and the failing step's last output
        lines."""
        with self._lock:
            end, tail = self._closing_entries()
            end = [*self._within_cap(end), *self._cut_note()]
            pending = [*self._buffer, *end, (self.attempt, "end", f"{FINAL_PREFIX} {final_state}")]
            self._buffer = deque(maxlen=self._max_buffered)
            self._keep(pending)
            return pending, tail

    def archived(self) -> bytes | None:
        """The attempt's whole stored log as a gzip file (once closed; None without an archive)."""
        with self._lock:
            return self._gz.finish() if self._gz is not None and self._closed else None

    def close(self, note: str | None = None) -> None:
        """Close the log and write everything now, ``note`` (a mark) last. Idempotent; never raises."""
        with self._lock:
            end, _ = self._closing_entries()
            end = [*self._within_cap(end), *self._cut_note()]
            if note is not None:
                end.append(self._lines.mark(note, closes=True))
            batch = deque([*self._buffer, *end])
            self._buffer = deque(maxlen=self._max_buffered)
        self._write(batch)

    def _closing_entries(self) -> tuple[list[Entry], list[str]]:
        """What closing adds (caller holds the lock): the renderer's end, once, and the failing tail."""
        if self._closed:
            return [], []
        self._closed = True
        try:
            return self._lines.finish()
        except Exception:
            self.feed_errors += 1
            return [], []

    def _buffer_all(self, entries: list[Entry]) -> None:
        self.dropped += max(0, len(self._buffer) + len(entries) - self._max_buffered)
        self._buffer.extend(entries)

    def _keep(self, batch: Iterable[Entry]) -> None:
        if self._gz is not None:
            self._gz.add([(kind, line) for _, kind, line in batch])

    def _write(self, batch: deque[Entry]) -> None:
        if not batch:
            return
        with self._lock:
            self._keep(batch)
            first = not self.written
        try:
            self.store.append(self.job_id, batch, first=first)
            self.written = True
            ok = True
        except Exception:  # Redis down or slow: the build goes on, the lines are lost
            ok = False
        with self._lock:
            if ok:
                self.flushes += 1
            else:
                self.failed_flushes += 1
                self.dropped += len(batch)
