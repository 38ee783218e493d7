"""Unions of time intervals (pure), shared by the phase computation and the plain-log renderer.

An interval is ``(start, end)``; ``end`` may be None for one still open, which reaches to the end
of time and so swallows every interval that starts after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, overload

Closed = tuple[float, float]
Open = tuple[float, float | None]


@overload
def union(intervals: Iterable[Closed], *, drop_empty: bool = False) -> list[Closed]: ...
@overload
def union(intervals: Iterable[Open], *, drop_empty: bool = False) -> list[Open]: ...
def union(intervals: Iterable[Any], *, drop_empty: bool = False) -> list[Any]:
    """Sorted, disjoint union; touching intervals merge. ``drop_empty`` skips closed ones ending at
    or before their start."""
    out: list[Open] = []
    for start, end in sorted(intervals, key=lambda iv: iv[0]):
        if drop_empty and end is not None and end <= start:
            continue
        if out:
            last_start, last_end = out[-1]
            if last_end is None:
                break
            if start <= last_end:
                out[-1] = (last_start, None if end is None else max(last_end, end))
                continue
        out.append((start, end))
    return out
