"""Helpers for tests that drive a buildctl stand-in: scenario JSON and genuine command lines.

A scenario travels either as a build arg (``--opt build-arg:STANDIN_SCENARIO=<json>``, works
through any launcher because it is part of argv) or as the environment variable
``STANDIN_SCENARIO``. See tests/standin/README.md for the kinds and their fields.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .standin_daemons import DIALS, LOG, STATE, daemon_slug

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


def cache_export_failed(strict: bool = False, **fields: Any) -> dict[str, Any]:
    """``succeed`` whose registry cache export fails: exit 0, no ``cache.manifest`` (as with
    ``ignore-error=true``); ``strict``: buildctl's exit 1 without ``ignore-error``.
    ``cache_export_error`` replaces the derived vertex error text."""
    return {"kind": "succeed", "cache_export": "fail-strict" if strict else "fail", **fields}


# ---- simulated daemons (env STANDIN_DAEMONS_DIR) ----------------------------------------------


def daemons_env(daemons_dir: str | Path) -> dict[str, str]:
    """``{"STANDIN_DAEMONS_DIR": <dir>}`` for the stand-in's environment."""
    return {"STANDIN_DAEMONS_DIR": str(daemons_dir)}


def daemon_dir(daemons_dir: str | Path, addr: str) -> Path:
    """Folder of the simulated daemon at ``addr`` (``tcp://127.0.0.1:1234`` → ``tcp___127.0.0.1_1234``)."""
    return Path(daemons_dir) / daemon_slug(addr)


def _write_state(daemons_dir: str | Path, addr: str, state: dict[str, Any]) -> None:
    folder = daemon_dir(daemons_dir, addr)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{STATE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, folder / STATE)


def daemon_down(daemons_dir: str | Path, addr: str, seconds: float, goaway: bool = True) -> float:
    """Stop the daemon at ``addr`` now for ``seconds`` (a restart); return ``down_until``.

    New builds and ``debug workers`` are refused until then; builds running now fail with the
    GOAWAY error (``goaway=True``) or finish (``goaway=False``: the daemon drains them).
    """
    now = time.time()
    _write_state(daemons_dir, addr, {"down_since": now, "down_until": now + seconds, "goaway": goaway})
    return now + seconds


def daemon_up(daemons_dir: str | Path, addr: str) -> None:
    """End the outage of the daemon at ``addr`` now (``down_until`` null; ``down_since`` kept)."""
    folder = daemon_dir(daemons_dir, addr)
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    _write_state(daemons_dir, addr, {**state, "down_until": None})


def _daemon_log(daemons_dir: str | Path, addr: str, name: str) -> list[dict[str, Any]]:
    """The JSON lines of the daemon's log ``name`` (none before its first line)."""
    path = daemon_dir(daemons_dir, addr) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def daemon_invocations(daemons_dir: str | Path, addr: str) -> list[dict[str, Any]]:
    """The daemon's ``invocations.log``: ``{"cmd","t","pid","key","outcome","variant","rc"}`` per line."""
    return _daemon_log(daemons_dir, addr, LOG)


def daemon_dials(daemons_dir: str | Path, addr: str) -> list[dict[str, Any]]:
    """The daemon's ``dials.log``: ``{"cmd","pid","t"}`` per invocation that reached it, written as it
    dials (the invocations log is written when an invocation ends)."""
    return _daemon_log(daemons_dir, addr, DIALS)


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


def daemon_disk_full(daemons_dir: str | Path, addr: str, full: bool = True) -> None:
    """The daemon at ``addr`` has a full disk (``full=False``: space again): it answers ``debug
    workers`` and dials, and every build fails as the genuine one did (err_vii_disk_full)."""
    folder = daemon_dir(daemons_dir, addr)
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    _write_state(daemons_dir, addr, {**state, "disk_full": full})
