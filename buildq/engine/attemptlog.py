"""The log of one running attempt: rendered, redacted and written to the job's stream as it happens.

:class:`AttemptLog` is what the worker feeds from the stderr reader thread: ``feed`` only renders
and buffers; a daemon flusher thread writes the buffer (:class:`~buildq.store.logs.LogStore`) at
most ``flush_interval_s`` after a line arrived (sooner when ``max_batch`` entries are waiting) and
counts, never raises, Redis errors. :class:`RawRedactor` masks secrets in the rawjson lines.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..buildkit.plainlog import MAX_PARTIAL_BYTES, PlainLogRenderer
from ..buildkit.solvestatus import SolveStatus, b64decode_lenient, parse_line
from ..store.logs import FINAL_PREFIX, Entry, LogStore
from .redact import Redactor

CLOSE_TIMEOUT_S = 30.0  # longest close() waits for the flusher's last write

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

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
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
        self.renderer = PlainLogRenderer(redact=redactor.redact if redactor is not None else None)
        self.raw = RawRedactor(redactor.redact) if redactor is not None else None

    def entries(self, line: str, status: SolveStatus | None) -> list[Entry]:
        a = self.attempt
        if status is None:  # buildctl's own text (error line, Dockerfile excerpt): both plain and raw
            text = self.redact(line)
            return [(a, "raw", text), (a, "plain", text)]
        raw = self.raw.line(line) if self.raw is not None else [line]
        return [(a, "raw", r) for r in raw] + [(a, "plain", p) for p in self.renderer.feed(status)]

    def finish(self) -> list[Entry]:
        """What the end of the stream still prints (held output, error summary)."""
        raw = self.raw.finish() if self.raw is not None else []
        return [(self.attempt, "raw", r) for r in raw] + [
            (self.attempt, "plain", p) for p in self.renderer.finish()
        ]

    def mark(self, text: str) -> Entry:
        return (self.attempt, "mark", self.redact(text))


class AttemptLog:
    """The log of one attempt: ``feed`` every stderr line (cheap, no I/O), ``close`` at the end.

    Entries reach Redis from a daemon flusher thread (started on the first feed) at most
    ``flush_interval_s`` after they were fed, or as soon as ``max_batch`` are waiting. Write failures
    are counted (``failed_flushes``, ``dropped``), never raised. When Redis falls behind, at most
    ``max_buffered`` (default: the stream's ``maxlen``) entries wait; older ones are dropped (and
    counted), as MAXLEN would trim them anyway. Thread-safe.
    """

    def __init__(
        self,
        store: LogStore,
        job_id: str,
        attempt: int,
        *,
        redactor: Redactor | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_interval_s: float = 0.2,
        max_batch: int = 200,
        max_buffered: int | None = None,
    ) -> None:
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self._lines = _Lines(attempt, redactor)
        self._clock = clock
        self._interval = flush_interval_s
        self._max_batch = max(1, max_batch)
        # what waits beyond the stream's cap would be trimmed right after writing: drop it, oldest first
        self._max_buffered = max(max_buffered or store.maxlen, self._max_batch)
        self._cond = threading.Condition()
        self._buffer: deque[Entry] = deque(maxlen=self._max_buffered)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._final_written = False
        # flushes: batches written (one round trip each); dropped: lost to Redis errors or a full buffer
        self.lines_fed = self.flushes = self.failed_flushes = self.dropped = self.feed_errors = 0

    def feed(self, line: str, status: SolveStatus | None = _PARSE) -> None:
        """Render, redact and buffer one stderr line; pass ``status`` when already parsed (None: text)."""
        with self._cond:
            if self._closed:
                return
            self.lines_fed += 1
            try:
                entries = self._lines.entries(line, parse_line(line) if status is _PARSE else status)
            except Exception:  # a malformed line must not break the build
                self.feed_errors += 1
                return
            was_empty = not self._buffer
            self._buffer_all(entries)
            if self._thread is None:
                name = f"buildq-log-{self.job_id[:16]}"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
            if was_empty or len(self._buffer) >= self._max_batch:
                self._cond.notify()

    def close(self, final_state: str | None = None) -> None:
        """Render the end (pending lines, error summary), write everything, stop the flusher.

        Idempotent; never raises. With ``final_state`` a ``final: <state>`` mark is written last
        (once, also when a plain ``close()`` came first).
        """
        with self._cond:
            tail = self._closing_entries(final_state)
            self._buffer_all(tail)
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(CLOSE_TIMEOUT_S)
            if not thread.is_alive():
                with self._cond:
                    self._thread = None
        if self._thread is None:
            with self._cond:
                batch, self._buffer = self._buffer, deque(maxlen=self._max_buffered)
            self._write(batch)

    def _closing_entries(self, final_state: str | None) -> list[Entry]:
        """What closing adds (caller holds the lock): the renderer's end once, the final mark once."""
        tail: list[Entry] = []
        if not self._closed:
            self._closed = True
            try:
                tail = self._lines.finish()
            except Exception:
                self.feed_errors += 1
        if final_state is not None and not self._final_written:
            self._final_written = True
            tail.append(self._lines.mark(f"{FINAL_PREFIX} {final_state}"))
        return tail

    def mark(self, text: str) -> None:
        """Buffer a ``mark`` line (attempt started, retrying); written in order with the lines."""
        with self._cond:
            self._buffer_all([self._lines.mark(text)])

    def drain(self, final_state: str | None = None) -> list[Entry]:
        """Close like :meth:`close`, but return the unwritten entries (and the ``final:`` mark), to be
        stored with the result; what the flusher had taken is written first, so they come last."""
        with self._cond:
            tail = self._closing_entries(final_state)
            pending = [*self._buffer, *tail]
            self._buffer = deque(maxlen=self._max_buffered)
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(CLOSE_TIMEOUT_S)
        return pending

    def failing_tail(self, n: int = 30) -> list[str]:
        """The last ``n`` output lines (redacted) of the failed step, else of the last step with output."""
        with self._cond:
            return self._lines.renderer.failing_tail(n)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                cond.wait_for(lambda: self._buffer or self._closed)
                deadline = self._clock() + self._interval
                while not self._closed and len(self._buffer) < self._max_batch:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                batch, self._buffer = self._buffer, deque(maxlen=self._max_buffered)
                last = self._closed
            self._write(batch)
            if last:
                return

    def _buffer_all(self, entries: list[Entry]) -> None:
        self.dropped += max(0, len(self._buffer) + len(entries) - self._max_buffered)
        self._buffer.extend(entries)

    def _write(self, batch: deque[Entry]) -> None:
        if not batch:
            return
        try:
            self.store.append(self.job_id, batch)
            ok = True
        except Exception:  # Redis down or slow: the build goes on, the lines are lost
            ok = False
        with self._cond:
            if ok:
                self.flushes += 1
            else:
                self.failed_flushes += 1
                self.dropped += len(batch)
