"""What issue 26's checks and masking cost a worker, measured (prints figures; not a test).

    .venv/bin/python bench/untrusted_cost.py

- masking one output line with a job's secrets: the forms masked before issue 26 (value, base64,
  URL-encoded) against now (plus quoted forms), on a capture's rawjson lines;
- holding back a possible secret at a 16 KiB release (``Redactor.safe_cut``) per release;
- the worker's checks of a local-context job (grants, pseudo-filesystems, roots, Dockerfile);
- the attempt log's byte cap (``BUILDQ_LOG_MAX_BYTES``) per fed line.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from buildq.config import load_settings
from buildq.contract.job import parse_job
from buildq.engine import redact
from buildq.engine.attemptlog import AttemptLog
from buildq.engine.lifecycle import WorkerChecks
from buildq.engine.redact import Redactor

ROOT = Path(__file__).resolve().parent.parent
CAPTURE = ROOT / "tests" / "fixtures" / "buildkit" / "builds" / "ctx_oci_rawjson_cold.stderr"
SECRETS = ["npm-Gr4nted-T0ken-51f0a9", "https://user:p4ss@reg.example/x?sig=abc%2Fdef", 'q"uote\\d-value']


def per_call(fn: Callable[[], Any], n: int) -> float:
    """Median of 7 rounds of ``n`` calls: µs per call."""
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


class NullStore:
    maxlen = 100_000

    def append(self, *args: Any, **kwargs: Any) -> None:
        pass


def main() -> None:
    lines = CAPTURE.read_text().splitlines()
    now = Redactor(SECRETS)
    with mock.patch.object(redact, "escaped_forms", lambda value: set()):
        before = Redactor(SECRETS)
    text = "\n".join(lines)
    print(f"capture: {len(lines)} rawjson lines, {len(text)} bytes")
    for name, masker in (("before (value, base64, URL forms)", before), ("now (+ quoted forms)", now)):
        us = per_call(lambda m=masker: [m(line) for line in lines], 200) / len(lines)
        print(f"  mask one line, {name}: {us:.2f} µs")
    long = b"x" * (16 * 1024 + 200)
    print(f"  safe_cut of one 16 KiB release: {per_call(lambda: now.safe_cut(long, len(long)), 2000):.1f} µs")

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp) / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text("FROM scratch\n")
        settings = load_settings(
            {"BUILDQ_BROKER_URL": "redis://127.0.0.1:1/0", "BUILDQ_SECRET_ENV": "BUILD_SECRET_*",
             "BUILDQ_ALLOWED_REPOSITORIES": "reg.example/team/*", "BUILDQ_CONTEXT_ROOTS": tmp}
        )  # fmt: skip
        checks = WorkerChecks(settings, {"BUILD_SECRET_NPM": "x" * 20})
        job = parse_job({"context": str(ctx), "tags": ["reg.example/team/app:1"],
                         "secrets": [{"id": "npm", "env": "BUILD_SECRET_NPM"}]})  # fmt: skip
        with_pseudo = per_call(lambda: checks(job), 5000)
        with mock.patch("buildq.engine.lifecycle.check_not_pseudo", lambda *args: None):
            without = per_call(lambda: checks(job), 5000)
        print(f"  worker checks of a local-context job: {with_pseudo:.1f} µs ({without:.1f} µs without the "
              "pseudo-filesystem checks)")  # fmt: skip

    def feed(cap: int) -> float:
        def run() -> None:
            log = AttemptLog(NullStore(), "job", 1, redactor=now, max_bytes=cap)  # type: ignore[arg-type]
            for line in lines:
                log.feed(line)

        return per_call(run, 50) / len(lines)

    plain, capped = feed(0), feed(16 << 20)
    print(f"  attempt log feed per line: no cap {plain:.2f} µs, with BUILDQ_LOG_MAX_BYTES {capped:.2f} µs")


if __name__ == "__main__":
    main()
