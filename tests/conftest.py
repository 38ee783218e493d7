from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import StandinLog, WorkerProcess, base_env, flush_dbs
from tests.standin import write_standin_executable

pytest_plugins = ["tests.conftest_docker"]

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    """Path of an executable ``buildctl`` stand-in (venv interpreter in its shebang)."""
    return write_standin_executable(tmp_path / "bin")


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    """A build context: the captures' Dockerfile and hello.txt."""
    ctx = tmp_path / "ctx"
    shutil.copytree(FIXTURES / "contexts" / "ctx", ctx)
    (ctx / "app").mkdir()
    return ctx


@pytest.fixture
def standin_log(tmp_path: Path) -> StandinLog:
    return StandinLog(tmp_path / "standin.jsonl")


@pytest.fixture
def buildq_env(standin: Path, standin_log: StandinLog) -> dict[str, str]:
    """Environment of an isolated buildq namespace: own Redis DBs (flushed), own queue, local launcher."""
    env = base_env(10, f"t{uuid.uuid4().hex[:8]}", BUILDQ_BUILDCTL_PATH=str(standin))
    env["STANDIN_LOG"] = str(standin_log.path)
    flush_dbs(env)
    return env


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(env, log_dir=tmp_path, **kwargs)
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for worker in workers:
        worker.stop()


def scenario(**spec: Any) -> str:
    """A stand-in scenario as the JSON a build arg or STANDIN_SCENARIO carries."""
    return json.dumps(spec, separators=(",", ":"))
