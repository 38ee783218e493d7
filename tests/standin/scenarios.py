"""Helpers for tests that drive a buildctl stand-in: scenario JSON and genuine command lines.

A scenario travels either as a build arg (``--opt build-arg:STANDIN_SCENARIO=<json>``, works
through any launcher because it is part of argv) or as the environment variable
``STANDIN_SCENARIO``. See tests/standin/README.md for the kinds and their fields.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "buildkit"

#: Patterns that recognise the gRPC-Unavailable family the ``flaky`` kind draws from.
TRANSIENT_RE = re.compile(
    r"code = Unavailable|Unavailable: |transport is closing|error reading from server: EOF"
    r"|keepalive ping failed|connection refused|received prior goaway"
)


def scenario_json(scenario: Mapping[str, Any]) -> str:
    return json.dumps(dict(scenario), separators=(",", ":"))


def scenario_opt(scenario: Mapping[str, Any]) -> list[str]:
    """``["--opt", "build-arg:STANDIN_SCENARIO=<json>"]`` to append to a build argv."""
    return ["--opt", "build-arg:STANDIN_SCENARIO=" + scenario_json(scenario)]


def scenario_env(scenario: Mapping[str, Any]) -> dict[str, str]:
    """``{"STANDIN_SCENARIO": <json>}`` for the stand-in's environment."""
    return {"STANDIN_SCENARIO": scenario_json(scenario)}


def succeed(**fields: Any) -> dict[str, Any]:
    """``capture``, ``pace``, ``sleep_s`` are optional."""
    return {"kind": "succeed", **fields}


def fail(error: str | None = None, **fields: Any) -> dict[str, Any]:
    """``after_lines``, ``rc``, ``error_capture``, ``sleep_s``, ``capture`` are optional."""
    return {"kind": "fail", **({"error": error} if error is not None else {}), **fields}


def hang(**fields: Any) -> dict[str, Any]:
    """``after_lines`` (default 5) lines, then sleep until killed."""
    return {"kind": "hang", **fields}


def flaky(state_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """``fail_first: n`` or ``p``/``seed``; ``key`` defaults to the first ``--output`` name."""
    return {"kind": "flaky", "state_dir": str(state_dir), **fields}


def genuine_argv(
    capture: str = "ctx_oci_rawjson_cold",
    *,
    context_dir: str,
    metadata_file: str,
    addr: str | None = None,
) -> list[str]:
    """The exact argv of a captured build (without the program name), paths replaced.

    The capture's context (``/build/<ctx>``) becomes ``context_dir``; its ``--metadata-file``
    becomes ``metadata_file``; ``addr`` replaces the ``--addr`` value when given.
    """
    folder = "extra" if capture.startswith("extra_") else "builds"
    words = shlex.split((FIXTURES / folder / f"{capture}.cmd").read_text(encoding="utf-8"))
    assert words[0] == "buildctl", words
    out: list[str] = []
    for i, word in enumerate(words[1:], start=1):
        prev = words[i - 1]
        if prev == "--metadata-file":
            word = metadata_file
        elif prev == "--addr" and addr is not None:
            word = addr
        else:
            word = re.sub(r"=/build/[^,\s]*", "=" + context_dir, word)
        out.append(word)
    return out
