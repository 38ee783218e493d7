"""One ``--progress=rawjson`` line parsed into plain data (BuildKit's ``client.SolveStatus``).

buildctl writes one JSON object per line to stderr:
``{"vertexes":[...],"statuses":[...],"logs":[...],"warnings":[...]}``; any key may be absent,
and a vertex is repeated in later lines as it changes (merge by digest downstream). Timestamps
are RFC 3339 with nanoseconds; they are parsed to float seconds since the epoch. Log ``data``
is base64 and stays encoded here (decode where it is used).

:func:`parse_line` never raises: a line that is not a SolveStatus object (the final
``error: ...`` line, ``Dockerfile:3`` context lines, logrus lines) returns ``None``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
