"""Per-job build logs in a capped Redis Stream: written live by the worker, read or followed by clients.

One stream per job (:func:`~buildq.store.keys.log_key`), shared by a retried job's attempts. Each
stream entry is one batch of one attempt's lines: fields ``a`` (the attempt number) and ``l``
(:func:`encode_lines`: the lines, each with a one-letter kind in front, joined by newlines). Kinds:
``raw`` (buildctl's stderr line as it came, redacted: the rawjson progress or buildctl's own text),
``mark`` (attempt started, the log cut) and ``end`` (a mark that closes its attempt: failed and
retrying, interrupted, ``final: <state>`` as the last line of a finished job). Each line is stored
once, raw; the ``--progress=plain`` view is rendered from it when read
(:class:`buildq.client.logview.PlainView`).

:class:`LogStore` writes a batch with one ``XADD`` (the stream's TTL is set with the first batch of
an attempt); the worker side that buffers an attempt's lines and flushes them every
:data:`FLUSH_EVERY_S` is :class:`buildq.engine.attemptlog.AttemptLog`. A finished job's log moves to
the archive when one is set up (:mod:`buildq.store.archive`); the stream then stays only for
``BUILDQ_LOG_ARCHIVED_TTL_S``, long enough for followers to read its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .keys import log_key

FINAL_PREFIX = "final:"
#: how often a running build's buffered lines are written (one XADD per running build each time)
FLUSH_EVERY_S = 2.0
_PAGE = 200

Entry = tuple[int, str, str]  # (attempt, kind, line)

_CODES = {"raw": "r", "mark": "m", "end": "e", "plain": "p"}
_KINDS = {code: kind for kind, code in _CODES.items()}


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line: the stream entry it came in (``id``), its attempt, kind and text. An ``end``
    line is shown as a mark (``kind`` is ``mark``, ``closes`` True)."""

    id: str
    attempt: int
    kind: str
    line: str
    closes: bool = False


def encode_lines(entries: Iterable[tuple[str, str]]) -> str:
    """(kind, line) pairs as one stream field: ``<letter><line>`` joined by newlines (a line's own
    newlines become spaces)."""
    return "\n".join(_CODES[kind] + line.replace("\n", " ").replace("\r", " ") for kind, line in entries)


def decode_lines(text: str) -> list[tuple[str, str]]:
    """What :func:`encode_lines` made: (kind, line) pairs; a line of an unknown kind is raw."""
    out = []
    for item in text.split("\n") if text else ():
        kind = _KINDS.get(item[:1])
        out.append((kind, item[1:]) if kind else ("raw", item))
    return out


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def entries_of(entry_id: Any, fields: dict[Any, Any]) -> list[LogEntry]:
    """The lines of one stream entry."""
    got = {_text(k): _text(v) for k, v in fields.items()}
    a = got.get("a", "")
    attempt = int(a) if a.isdigit() else 0
    sid = _text(entry_id)
    return [
        LogEntry(sid, attempt, "mark" if kind == "end" else kind, line, kind == "end")
        for kind, line in decode_lines(got.get("l", ""))
    ]


class LogStore:
    """Job logs as capped, expiring Redis Streams. Methods raise the client's Redis errors."""

    def __init__(self, redis_client: Any, *, maxlen: int, ttl_s: int) -> None:
        self.redis = redis_client
        self.maxlen = maxlen
        self.ttl_s = ttl_s

    def append(self, job_id: str, entries: Iterable[Entry], *, first: bool = False) -> None:
        """Add the entries as one stream entry per attempt (in order), trimming to about ``maxlen``
        entries; ``first`` (an attempt's first batch) also sets the stream's TTL. One round trip;
        nothing is sent when there are no entries."""
        groups: list[tuple[int, list[tuple[str, str]]]] = []
        for attempt, kind, line in entries:
            if not groups or groups[-1][0] != attempt:
                groups.append((attempt, []))
            groups[-1][1].append((kind, line))
        if not groups:
            return
        key = log_key(job_id)
        pipe = self.redis.pipeline(transaction=False)
        for attempt, lines in groups:
            pipe.xadd(key, {"a": attempt, "l": encode_lines(lines).encode("utf-8", "replace")},
                      maxlen=self.maxlen, approximate=True)  # fmt: skip
        if first:
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    def read(
        self,
        job_id: str,
        *,
        kinds: Iterable[str] = ("raw", "mark"),
        after: str = "0-0",
        count: int | None = None,
    ) -> list[LogEntry]:
        """Stored lines of the given kinds in entries after ``after``, oldest first (at most
        ``count``)."""
        wanted = frozenset(kinds)
        out: list[LogEntry] = []
        start = f"({after}"
        while True:
            page = self.redis.xrange(log_key(job_id), min=start, max="+", count=_PAGE)
            for entry_id, fields in page:
                for entry in entries_of(entry_id, fields):
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
        kinds: Iterable[str] = ("raw", "mark"),
        is_finished: Callable[[], bool],
        block_ms: int = 500,
        after: str = "0-0",
    ) -> Iterator[LogEntry]:
        """Yield lines as they arrive (``XREAD BLOCK``), across attempts.

        Ends after the ``final: <state>`` line (yielded when ``mark`` is among ``kinds``), or when a
        block period passes with no new entry, ``is_finished()`` is then true and one read more still
        finds nothing (a worker that died before writing the final mark; the read after the check
        catches a finishing write that landed between the empty wait and the check). The client's
        socket timeout must exceed ``block_ms``.
        """
        wanted, key, last = frozenset(kinds), log_key(job_id), after
        finished = False
        while True:
            # once finished, one read more without waiting: what the finishing write added between
            # the last empty read and is_finished()
            reply = self.redis.xread({key: last}, count=_PAGE, block=None if finished else block_ms)
            if isinstance(reply, dict):  # RESP3: {key: [[(id, fields), ...]]}
                batches = [batch for value in reply.values() for batch in value]
            else:  # RESP2: [[key, [(id, fields), ...]]]
                batches = [batch for _, batch in reply or ()]
            stream = [(i, f) for batch in batches for i, f in batch]
            if not stream:
                if finished:
                    return
                finished = is_finished()
                continue
            for entry_id, fields in stream:
                last = _text(entry_id)
                for entry in entries_of(entry_id, fields):
                    if entry.kind in wanted:
                        yield entry
                    if entry.closes and entry.line.startswith(FINAL_PREFIX):
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
