"""The tests are good neighbours: a developer's Redis on 127.0.0.1:6379 stays untouched.

``.ci/with-developer-redis.sh CMD`` runs CMD in a network namespace of its own whose 6379 is a
redis-server holding a developer's data, and fails when CMD touched it. CI runs the whole test
command through it (``.ci/run``); here a part of the suite goes through it (the parts that once
wrote to fixed DBs of 6379, the CLI with default settings, real workers), and the check itself is
shown to catch a command that touches that Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import clean_environ

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "with-developer-redis.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of its own needs root")


def beside_a_developers_redis(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` through the script, without this run's BUILDQ_* (the inner run starts its own)."""
    env = clean_environ("BUILDQ_", "PYTEST_")
    return subprocess.run(
        ["bash", str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_check_catches_a_command_that_writes_to_or_only_reads_that_redis() -> None:
    quiet = beside_a_developers_redis("true")
    assert quiet.returncode == 0 and "untouched" in quiet.stderr, quiet.stderr
    flushed = beside_a_developers_redis("redis-cli", "-n", "12", "flushdb")
    assert flushed.returncode == 1 and "its data changed" in flushed.stderr, flushed.stderr
    read = beside_a_developers_redis("redis-cli", "-n", "3", "get", "developer:note:3")
    assert read.stdout.strip() == "mine, db 3"  # it is there, with its data
    assert read.returncode == 1 and "1 connection(s) were made to it" in read.stderr, read.stderr
    failed = beside_a_developers_redis("sh", "-c", "exit 3")
    assert failed.returncode == 3, failed.stderr


def test_the_suite_leaves_a_developers_redis_alone() -> None:
    part = ["tests/test_docs.py", "tests/test_logs.py", "tests/test_health.py", "tests/test_job_file.py"]
    inner = beside_a_developers_redis(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *part)
    assert "untouched" in inner.stderr, inner.stdout[-3000:] + inner.stderr[-3000:]
    assert inner.returncode == 0, inner.stdout[-3000:] + inner.stderr[-3000:]
