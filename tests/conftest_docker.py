"""Fixtures for tests marked ``docker``: buildq's own Docker engine and the stand-in image.

Loaded from tests/conftest.py with ``pytest_plugins = ["tests.conftest_docker"]``.
The session fixture runs ``.ci/dockerd.sh`` (idempotent: installs the engine when missing, starts
it on its own socket, rebuilds ``buildq/buildctl-standin:test`` when the stand-in changed) and
fails the test, never skips it, when that does not give a working engine.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import clean_environ

ROOT = Path(__file__).resolve().parent.parent
DOCKERD_SCRIPT = ROOT / ".ci" / "dockerd.sh"
DOCKER_URL = "unix:///run/buildq-dockerd/docker.sock"
STANDIN_IMAGE = "buildq/buildctl-standin:test"
MANAGED_FILTER = {"label": ["buildq.managed=true"]}
#: the deployment of this test run's docker launchers: another run's reapers never see their containers
RUN_DEPLOYMENT = f"tests-{uuid.uuid4().hex[:8]}"


def _engine_answers(url: str) -> bool:
    import docker

    try:
        docker.APIClient(base_url=url, version="auto", timeout=5).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def docker_url() -> str:
    """URL of a Docker engine that answers and holds the stand-in image (started if needed)."""
    # Run the script even when the engine answers: it rebuilds the image if the stand-in changed
    # (about 0.1 s when nothing is to do).
    proc = subprocess.run(
        ["bash", str(DOCKERD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        stdin=subprocess.DEVNULL,
        env=clean_environ(),  # the engine must not inherit a terminal's COLUMNS (the script drops it too)
    )
    if proc.returncode != 0 or not _engine_answers(DOCKER_URL):
        pytest.fail(
            f".ci/dockerd.sh could not provide a Docker engine at {DOCKER_URL} (rc {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return DOCKER_URL


@pytest.fixture(scope="session")
def docker_api(docker_url: str) -> Any:
    """A raw docker SDK APIClient on buildq's engine, for assertions."""
    import docker

    return docker.APIClient(base_url=docker_url, version="auto", timeout=30)


def docker_settings_for(docker_url: str, **overrides: Any) -> Any:
    from buildq.config import load_settings

    values: dict[str, Any] = {
        "launcher": "docker",
        "buildctl_image": STANDIN_IMAGE,
        "docker_url": docker_url,
        "docker_network": "none",
        "deployment": RUN_DEPLOYMENT,
    }
    values.update(overrides)
    return load_settings({}, **values)


@pytest.fixture
def docker_settings(docker_url: str) -> Any:
    """Settings for the docker launcher running the stand-in image with network ``none``."""
    return docker_settings_for(docker_url)


@pytest.fixture
def docker_job_id(docker_api: Any) -> Iterator[Callable[[], str]]:
    """Makes job ids unique to this test; removes every container labelled with them at teardown."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    made: list[str] = []

    def new() -> str:
        made.append(f"{prefix}-{len(made) + 1}")
        return made[-1]

    yield new
    for job in made:
        for c in docker_api.containers(all=True, filters={"label": [f"buildq.job_id={job}"]}):
            try:
                docker_api.remove_container(c["Id"], v=True, force=True)
            except Exception:  # best-effort cleanup
                pass


@pytest.fixture
def build_context(tmp_path: Path) -> Path:
    """A small worker-side build context (Dockerfile + hello.txt)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\n")
    (ctx / "hello.txt").write_text("hello\n")
    os.chmod(ctx, 0o755)
    return ctx


@pytest.fixture
def docker_launcher(docker_url: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Makes DockerLaunchers on buildq's engine (stand-in image, network ``none``, context roots
    ``[tmp_path]``, shared folders under ``tmp_path``); their warm containers go at teardown."""
    from buildq.launchers.docker import DockerLauncher

    made: list[DockerLauncher] = []

    def make(channel: str = "auto", clock: Callable[[], float] | None = None, **overrides: Any) -> Any:
        overrides.setdefault("context_roots", [str(tmp_path)])
        kwargs: dict[str, Any] = {"channel": channel, "state_dir": str(tmp_path / "state")}
        if clock is not None:
            kwargs["clock"] = clock
        made.append(DockerLauncher(docker_settings_for(docker_url, **overrides), **kwargs))
        return made[-1]

    yield make
    for launcher in made:
        launcher.close()
