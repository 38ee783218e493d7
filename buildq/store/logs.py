"""Per-job build logs in a capped Redis Stream: written live by the worker, read or followed by clients.

One stream per job (:func:`~buildq.store.keys.log_key`); each entry has fields ``a`` (attempt number),
``k`` (kind) and ``l`` (the line). Kinds: ``plain`` (``--progress=plain``-like text rendered by
:class:`~buildq.buildkit.plainlog.PlainLogRenderer`, plus buildctl's non-JSON stderr lines),
``raw`` (the rawjson stderr line, redacted) and ``mark`` (attempt started / failed / retrying, and
``final: <state>`` as the last entry of a finished job). Attempts of a retried job share the stream.

:class:`LogStore` writes a batch in one pipelined round trip (``XADD MAXLEN ~`` each, then
``EXPIRE``); the worker side that renders and buffers an attempt's lines is
:class:`buildq.engine.attemptlog.AttemptLog`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .keys import log_key

FINAL_PREFIX = "final:"
_PAGE = 1000

Entry = tuple[int, str, str]  # (attempt, kind, line)


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
        :func:`buildq.store.claim.finish` instead, with the result."""
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
