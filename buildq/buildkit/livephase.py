"""Which phase a running build is in, from its progress stream, as it happens (pure).

:class:`LivePhases` is fed the parsed SolveStatus updates of one attempt and reports each phase
*as it ends* (name, seconds on the worker's clock), so a Celery event can be sent per phase and
the result backend can show the current phase while the build runs. These live figures are
approximate (a phase is "current" from the first update that names it until another phase takes
over); the result record's ``phases`` (computed from the whole stream by ``phases.py``) are the
authoritative values.
"""

from __future__ import annotations

from collections.abc import Callable

from .phases import classify, is_push_status
from .solvestatus import SolveStatus

Ended = tuple[str, float]


class LivePhases:
    """Current phase of one attempt; starts in ``launch`` at ``started_at``."""

    def __init__(self, clock: Callable[[], float], started_at: float) -> None:
        self._clock = clock
        self.current = "launch"
        self.since = started_at

    def _switch(self, phase: str) -> list[Ended]:
        if phase == self.current:
            return []
        now = self._clock()
        ended = [(self.current, max(0.0, now - self.since))]
        self.current, self.since = phase, now
        return ended

    def on_output(self, status: SolveStatus | None) -> list[Ended]:
        """Take one stderr line's parsed update (None for a text line); return the phases that ended."""
        # the first output ends ``launch``; a build always begins by loading its definition
        ended = self._switch("context") if self.current == "launch" else []
        if status is None:
            return ended
        phase = None
        for vertex in status.vertexes:
            if vertex.started is not None and vertex.completed is None:
                phase = classify(vertex.name)
        for st in status.statuses:
            if st.completed is None and is_push_status(st.id):
                phase = "push"
        if phase is not None:
            ended += self._switch(phase)
        return ended

    def finish(self) -> list[Ended]:
        """buildctl exited: the current phase ends now and ``finalize`` begins."""
        return self._switch("finalize")
