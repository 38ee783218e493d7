"""Per-job build logs in a capped Redis Stream: written live by the worker, read or followed by clients.

One stream per job, key ``buildq:log:<job_id>``; each entry has fields ``a`` (attempt number),
``k`` (kind) and ``l`` (the line). Kinds: ``plain`` (``--progress=plain``-like text rendered by
:class:`~buildq.buildkit.plainlog.PlainLogRenderer`, plus buildctl's non-JSON stderr lines),
``raw`` (the rawjson stderr line, redacted) and ``mark`` (attempt started / failed / retrying, and
``final: <state>`` as the last entry of a finished job). Attempts of a retried job share the stream.

:class:`LogStore` writes a batch in one pipelined round trip (``XADD MAXLEN ~`` each, then
``EXPIRE``). :class:`AttemptLog` is what the worker feeds from the stderr reader thread: ``feed`` only
renders and buffers; a daemon flusher thread writes the buffer at most ``flush_interval_s`` after
a line arrived (sooner when ``max_batch`` entries are waiting) and counts, never raises, Redis errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from buildq.buildkit.plainlog import MAX_PARTIAL_BYTES, PlainLogRenderer
from buildq.buildkit.solvestatus import SolveStatus, parse_line
from buildq.redact import Redactor

KEY_PREFIX = "buildq:log:"
FINAL_PREFIX = "final:"
CLOSE_TIMEOUT_S = 30.0  # longest close() waits for the flusher's last write
_PAGE = 1000

Entry = tuple[int, str, str]  # (attempt, kind, line)


def log_key(job_id: str) -> str:
    """The Redis key of a job's log stream."""
    return KEY_PREFIX + job_id


@dataclass(frozen=True, slots=True)
class LogEntry:
    id: str
    attempt: int
    kind: str
    line: str


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _entry(entry_id: Any, fields: dict[Any, Any]) -> LogEntry:
    got = {_text(k): _text(v) for k, v in fields.items()}
    a = got.get("a", "")
    return LogEntry(_text(entry_id), int(a) if a.isdigit() else 0, got.get("k", ""), got.get("l", ""))


class LogStore:
    """Job logs as capped, expiring Redis Streams. Methods raise the client's Redis errors."""

    def __init__(self, redis_client: Any, *, maxlen: int, ttl_s: int) -> None:
        self.redis = redis_client
        self.maxlen = maxlen
        self.ttl_s = ttl_s

    def append(self, job_id: str, entries: Iterable[Entry]) -> None:
        """Add entries in order, trimming to about ``maxlen``, and refresh the TTL: one round trip
        (nothing is sent when there are no entries). The end of a build's log is written by
        :func:`buildq.claim.finish` instead, with the result."""
        key, pipe = log_key(job_id), None
        for attempt, kind, line in entries:
            if pipe is None:
                pipe = self.redis.pipeline(transaction=False)
            fields = {"a": attempt, "k": kind, "l": line.encode("utf-8", errors="replace")}
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
        if pipe is not None:
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def mark(self, job_id: str, attempt: int, text: str) -> None:
        """Append one ``mark`` line (attempt started / failed / retrying, ``final: <state>``)."""
        self.append(job_id, [(attempt, "mark", text)])

    def read(
        self,
        job_id: str,
        *,
        kinds: Iterable[str] = ("plain", "mark"),
        after: str = "0-0",
        count: int | None = None,
    ) -> list[LogEntry]:
        """Stored entries of the given kinds with ids after ``after``, oldest first (at most ``count``)."""
        wanted = frozenset(kinds)
        out: list[LogEntry] = []
        start = f"({after}"
        while True:
            page = self.redis.xrange(log_key(job_id), min=start, max="+", count=_PAGE)
            for entry_id, fields in page:
                entry = _entry(entry_id, fields)
                if entry.kind in wanted:
                    out.append(entry)
                    if count is not None and len(out) >= count:
                        return out
            if len(page) < _PAGE:
                return out
            start = f"({_text(page[-1][0])}"

    def follow(
        self,
        job_id: str,
        *,
        kinds: Iterable[str] = ("plain", "mark"),
        is_finished: Callable[[], bool],
        block_ms: int = 500,
        after: str = "0-0",
    ) -> Iterator[LogEntry]:
        """Yield entries as they arrive (``XREAD BLOCK``), across attempts.

        Ends after the ``final: <state>`` mark (yielded when ``mark`` is among ``kinds``), or when a
        block period passes with no new entry while ``is_finished()`` is true (a worker that died
        before writing the final mark). The client's socket timeout must exceed ``block_ms``.
        """
        wanted, key, last = frozenset(kinds), log_key(job_id), after
        while True:
            reply = self.redis.xread({key: last}, count=_PAGE, block=block_ms)
            if isinstance(reply, dict):  # RESP3: {key: [[(id, fields), ...]]}
                batches = [batch for value in reply.values() for batch in value]
            else:  # RESP2: [[key, [(id, fields), ...]]]
                batches = [batch for _, batch in reply or ()]
            entries = [_entry(i, f) for batch in batches for i, f in batch]
            if not entries:
                if is_finished():
                    return
                continue
            for entry in entries:
                last = entry.id
                if entry.kind in wanted:
                    yield entry
                if entry.kind == "mark" and entry.line.startswith(FINAL_PREFIX):
                    return


def final_state(entries: Iterable[LogEntry]) -> str | None:
    """The state named by the last ``final: <state>`` mark, or None when there is none."""
    state = None
    for entry in entries:
        if entry.kind == "mark" and entry.line.startswith(FINAL_PREFIX):
            state = entry.line[len(FINAL_PREFIX) :].strip()
    return state


def format_entry(entry: LogEntry, *, show_attempt: bool) -> str:
    """One entry as printed: marks as ``--- attempt 2: text ---``, lines prefixed ``[attempt 2] ``."""
    if entry.kind == "mark":
        return f"--- attempt {entry.attempt}: {entry.line} ---" if show_attempt else f"--- {entry.line} ---"
    return f"[attempt {entry.attempt}] {entry.line}" if show_attempt else entry.line


def show_attempts(entries: Iterable[LogEntry]) -> bool:
    """Whether the entries span more than one attempt (then :func:`format_entry` should say which)."""
    return len({e.attempt for e in entries}) > 1


# -- raw lines ---------------------------------------------------------------------------------
_KEEP = frozenset({"digest", "vertex", "inputs", "started", "completed", "timestamp"})  # ids and times
_B64 = frozenset({"data", "short", "detail"})  # base64 payloads: redacted decoded


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        return data.encode("utf-8", errors="replace")  # as PlainLogRenderer reads it


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
        text = _b64decode(data).decode("utf-8", errors="surrogateescape")
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
        data = _b64decode(str(entry.get("data") or ""))
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
        self._redact: Callable[[str], str] = redactor.redact if redactor is not None else (lambda text: text)
        self._renderer = PlainLogRenderer(redact=redactor.redact if redactor is not None else None)
        self._raw = RawRedactor(redactor.redact) if redactor is not None else None
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
        self.lines_fed = 0
        self.flushes = 0  # batches written (one Redis round trip each)
        self.failed_flushes = 0
        self.dropped = 0  # entries lost to Redis errors or a full buffer
        self.feed_errors = 0

    def feed(self, line: str, status: SolveStatus | None = _PARSE) -> None:
        """Render, redact and buffer one stderr line; pass ``status`` when already parsed (None: text)."""
        with self._cond:
            if self._closed:
                return
            self.lines_fed += 1
            try:
                entries = self._entries(line, parse_line(line) if status is _PARSE else status)
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

    def _entries(self, line: str, status: SolveStatus | None) -> list[Entry]:
        a = self.attempt
        if status is None:  # buildctl's own text (error line, Dockerfile excerpt): both plain and raw
            text = self._redact(line)
            return [(a, "raw", text), (a, "plain", text)]
        raw = self._raw.line(line) if self._raw is not None else [line]
        return [(a, "raw", r) for r in raw] + [(a, "plain", p) for p in self._renderer.feed(status)]

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
                raw = self._raw.finish() if self._raw is not None else []
                tail = [(self.attempt, "raw", r) for r in raw]
                tail += [(self.attempt, "plain", p) for p in self._renderer.finish()]
            except Exception:
                self.feed_errors += 1
        if final_state is not None and not self._final_written:
            self._final_written = True
            tail.append((self.attempt, "mark", f"{FINAL_PREFIX} {self._redact(final_state)}"))
        return tail

    def mark(self, text: str) -> None:
        """Buffer a ``mark`` line (attempt started, retrying); written in order with the lines."""
        with self._cond:
            self._buffer_all([(self.attempt, "mark", self._redact(text))])

    def drain(self, final_state: str | None = None) -> list[Entry]:
        """Close like :meth:`close`, but return the unwritten entries (and the ``final:`` mark)
        instead of writing them, so the end of the log is stored in the same round trip as the
        build's result. Everything the flusher had taken is written before this returns, so the
        returned entries come after everything already in the stream.
        """
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
            return self._renderer.failing_tail(n)

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
