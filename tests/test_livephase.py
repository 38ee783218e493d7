"""LivePhases reports each phase as it ends, replaying a genuine capture with an injected clock."""

from __future__ import annotations

from pathlib import Path

from buildq.buildkit.phases import LivePhases
from buildq.buildkit.progress import parse_line

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"


class StepClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_end_in_pipeline_order_with_clock_durations() -> None:
    clock = StepClock()
    live = LivePhases(clock, started_at=100.0)
    ended: list[tuple[str, float]] = []
    lines = (FIXTURES / "builds" / "ctx_oci_rawjson_cold.stderr").read_text().splitlines()
    for line in lines:
        clock.now += 0.01
        ended += live.on_output(parse_line(line))
    clock.now += 0.5
    ended += live.finish()
    names = [name for name, _ in ended]
    assert names[0] == "launch"
    assert abs(ended[0][1] - 0.01) < 1e-9  # started at 100.0, first output at 100.01
    # each phase of this COPY-only build shows up, in pipeline order of first appearance
    firsts = list(dict.fromkeys(names))
    assert firsts == ["launch", "context", "cache_import", "build", "export_image", "push", "cache_export"]
    assert names[-1] == "cache_export" and ended[-1][1] >= 0.5
    assert live.current == "finalize"
    # every second of the attempt is in exactly one reported phase
    assert abs(sum(secs for _, secs in ended) - (clock.now - 100.0)) < 1e-9


def test_text_lines_only_end_launch() -> None:
    clock = StepClock()
    live = LivePhases(clock, started_at=100.0)
    clock.now = 101.0
    assert live.on_output(None) == [("launch", 1.0)]
    assert live.on_output(None) == []
    assert live.current == "context"
