"""The ``--progress=plain`` view of a stored log, rendered when read.

A log stores each line once, raw (:mod:`buildq.store.logs`). :class:`PlainView` turns those lines
into what the worker's renderer would print — ``#N [stage] step`` lines, step output, ``DONE``/
``CACHED``/``ERROR`` and the error summary — with one :class:`~buildq.buildkit.plainlog.
PlainLogRenderer` per attempt, ended at the mark that closes the attempt. It keeps its state
between calls, so a followed log is rendered as it grows. Marks pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..buildkit.plainlog import PlainLogRenderer
from ..buildkit.progress import parse_line
from ..store.logs import LogEntry


class PlainView:
    """Raw log entries in, plain entries out (kind ``plain`` or ``mark``)."""

    def __init__(self) -> None:
        self._renderers: dict[int, PlainLogRenderer] = {}
        self._ended: set[int] = set()

    def feed(self, entries: Iterable[LogEntry]) -> Iterator[LogEntry]:
        for entry in entries:
            if entry.kind == "mark":
                if entry.closes:
                    yield from self._end(entry)
                yield entry
            elif entry.kind == "raw":
                yield from self._raw(entry)
            else:
                yield entry

    def _raw(self, entry: LogEntry) -> Iterator[LogEntry]:
        status = parse_line(entry.line)
        if status is None:  # buildctl's own text
            yield LogEntry(entry.id, entry.attempt, "plain", entry.line)
            return
        renderer = self._renderers.setdefault(entry.attempt, PlainLogRenderer())
        for line in renderer.feed(status):
            yield LogEntry(entry.id, entry.attempt, "plain", line)

    def _end(self, mark: LogEntry) -> Iterator[LogEntry]:
        if mark.attempt in self._ended:
            return
        self._ended.add(mark.attempt)
        renderer = self._renderers.get(mark.attempt)
        if renderer is not None:
            for line in renderer.finish():
                yield LogEntry(mark.id, mark.attempt, "plain", line)

    def end(self) -> Iterator[LogEntry]:
        """What the attempts not closed yet still print (a read of the log as it stands now)."""
        for attempt in sorted(set(self._renderers) - self._ended):
            yield from self._end(LogEntry("end", attempt, "mark", "", True))


def plain(entries: Iterable[LogEntry]) -> list[LogEntry]:
    """A stored log's plain view as it stands (each attempt's pending lines printed at its end)."""
    view = PlainView()
    return [*view.feed(entries), *view.end()]
