"""An engine started from a terminal: COLUMNS=80 LINES=24 in dockerd's environment.

dockerd runs its host's ``ps`` for ``docker top``, and ps cuts each command line to what fits in
COLUMNS: 32 characters of ``ps -ef``'s command column. Builds left behind in warm containers were
found by their command line, so on such an engine they were never found and never reaped. This
module starts an engine of its own that way and shows that they are found now.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from buildq.launchers.docker import DockerLauncher
from buildq.launchers.docker.plan import jobs_in_top
from buildq.launchers.docker.reap import top
from tests.conftest_docker import STANDIN_IMAGE, docker_settings_for
from tests.harness import clean_environ, wait_until
from tests.standin.scenarios import hang, scenario_opt
from tests.test_launcher_docker import reader, start

TERMINAL = {"COLUMNS": "80", "LINES": "24"}


def _answers(api: Any) -> bool:
    try:
        return bool(api.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


@pytest.fixture(scope="module")
def narrow_engine(docker_api: Any) -> Iterator[tuple[str, Any]]:
    """(URL, API client) of a Docker engine of this module's own, started with a terminal's
    COLUMNS and LINES in its environment (own socket, data and exec roots in a temporary folder,
    vfs storage), holding the stand-in image copied from buildq's engine. Stopped at the end."""
    import docker

    dockerd = shutil.which("dockerd")
    assert dockerd, "dockerd is not installed (.ci/dockerd.sh installs it)"
    folder = Path(tempfile.mkdtemp(prefix="bq-narrow-", dir="/tmp"))  # short: a socket path's limit
    url = f"unix://{folder}/docker.sock"
    argv = [
        dockerd, "--host", url, "--data-root", f"{folder}/data", "--exec-root", f"{folder}/exec",
        "--pidfile", f"{folder}/dockerd.pid", "--iptables=false", "--ip-masq=false", "--bridge=none",
        "--storage-driver", "vfs",
    ]  # fmt: skip
    with open(folder / "dockerd.log", "wb") as log:
        proc = subprocess.Popen(
            argv, env={**clean_environ(), **TERMINAL}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    api = docker.APIClient(base_url=url, version=docker_api.api_version, timeout=60)  # no call yet
    try:
        wait_until(lambda: _answers(api) or proc.poll() is not None, timeout=60, interval=0.1)
        assert proc.poll() is None, (folder / "dockerd.log").read_text()[-3000:]
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"COLUMNS=80" in environ and b"LINES=24" in environ
        api.load_image(docker_api.get_image(STANDIN_IMAGE))
        yield url, api
    finally:
        stop_engine(proc, folder)


def stop_engine(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """SIGTERM (the engine stops its containers and unmounts its roots), then remove its folder."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if f" {folder}/" not in Path("/proc/self/mounts").read_text():  # never delete through a mount
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def narrow_launcher(
    narrow_engine: tuple[str, Any], tmp_path: Path
) -> Iterator[Callable[[str], DockerLauncher]]:
    """Makes DockerLaunchers on the narrow engine (as ``docker_launcher`` does on buildq's)."""
    made: list[DockerLauncher] = []

    def make(channel: str) -> DockerLauncher:
        settings = docker_settings_for(narrow_engine[0], context_roots=[str(tmp_path)])
        made.append(DockerLauncher(settings, channel=channel, state_dir=str(tmp_path / "state")))
        return made[-1]

    yield make
    for launcher in made:
        launcher.close()


@pytest.mark.docker
@pytest.mark.parametrize("channel", ["fifo", "exec"])
def test_an_orphan_in_a_warm_container_is_found_on_an_engine_started_with_columns_80(
    narrow_engine, narrow_launcher, build_context, channel
) -> None:
    api = narrow_engine[1]
    job = f"n{uuid.uuid4().hex[:8]}-1"
    build = start(narrow_launcher(channel), job, build_context, *scenario_opt(hang(after_lines=1)))
    try:
        seen, _, _ = reader(build)
        assert seen.wait(30)
        # the engine cuts command lines as an 80-column terminal would: no metadata path in them
        assert jobs_in_top(api.top(build.box.id)) == []
        reaper = narrow_launcher(channel)  # another worker process: it only sees the engine
        assert job in reaper.find_orphans()  # the runner's own pid files
        assert jobs_in_top(top(api, build.box.id)) == [job]  # docker top as buildq reads it: whole lines
        reaper.kill_orphan(job)
        assert build.wait(timeout=10) == 137
        assert job not in reaper.find_orphans()
    finally:
        build.close()
