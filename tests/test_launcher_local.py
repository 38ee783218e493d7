"""The local launcher: environment, pid files and orphans (a tiny shell script as buildctl)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from buildq.launchers.base import LaunchSpec
from buildq.launchers.local import LocalLauncher, default_state_dir


def script(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "bin" / "buildctl"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return str(exe)


def run(launcher: LocalLauncher, job_id: str, env: dict[str, str] | None = None):  # noqa: ANN201
    paths = launcher.prepare(job_id, None, None)
    spec = LaunchSpec(job_id=job_id, argv=["build"], env=env or {}, context_dir=None, dockerfile_dir=None)
    return launcher.start(spec, paths)


def test_buildctl_gets_the_worker_environment_plus_the_spec(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BUILDQ_TEST_WORKER_VAR", "from-worker")
    exe = script(tmp_path, 'echo "$BUILDQ_TEST_WORKER_VAR|$BUILDKIT_HOST|$SECRET_X" >&2\n')
    launcher = LocalLauncher(exe, state_dir=str(tmp_path / "state"))
    for host in ("tcp://a:1", "tcp://b:2"):  # the spec's variables do not leak into the next build
        build = run(
            launcher, "env-job", {"BUILDKIT_HOST": host, **({"SECRET_X": "s"} if host.endswith("1") else {})}
        )
        lines = list(build.lines())
        assert build.wait() == 0
        build.close()
        assert lines == [f"from-worker|{host}|{'s' if host.endswith('1') else ''}"]


def test_a_running_build_is_an_orphan_candidate_until_closed(tmp_path: Path) -> None:
    # "true" after the sleep: sh stays the process (its cmdline names the script), never execs sleep
    launcher = LocalLauncher(script(tmp_path, "sleep 60\ntrue\n"), state_dir=str(tmp_path / "state"))
    build = run(launcher, "job-a")
    assert launcher.find_orphans() == ["job-a"]
    launcher.kill_orphan("job-a")  # another process's view: the pid file names the process group
    assert build.wait(10) != 0
    build.close()
    assert launcher.find_orphans() == []


def test_pid_file_directory_is_made_again_when_cleaned_away(tmp_path: Path) -> None:
    state = tmp_path / "state"
    launcher = LocalLauncher(script(tmp_path, "sleep 60\n"), state_dir=str(state))
    first = run(launcher, "job-1")
    first.kill()
    first.close()
    shutil.rmtree(state)
    second = run(launcher, "job-2")
    try:
        assert launcher.find_orphans() == ["job-2"]
    finally:
        second.kill()
        second.close()


def test_kill_orphan_leaves_a_recycled_pid_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    launcher = LocalLauncher(script(tmp_path, "exit 0\n"), state_dir=str(state))
    # a pid file whose process group is this test process: not started from buildctl, so not killed
    (state / f"job-x.{os.getpid()}.pid").write_text(
        f'{{"job_id": "job-x", "pgid": {os.getpgid(0)}, "exe": "{launcher.buildctl_path}"}}'
    )
    launcher.kill_orphan("job-x")
    time.sleep(0.01)
    assert launcher.find_orphans() == []  # the stale pid file is gone, and we are still here


def test_state_dir_defaults_to_memory_backed_shm_when_writable(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    assert default_state_dir(str(shm)) == str(shm / "buildq-local")
    assert default_state_dir(str(tmp_path / "absent")) == os.path.join(tempfile.gettempdir(), "buildq-local")


def test_metadata_files_go_to_a_scratch_dir_under_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    launcher = LocalLauncher(script(tmp_path, "exit 0\n"), state_dir=str(state))
    paths = launcher.prepare("job-m", None, None)
    assert Path(paths.metadata_file).parent.parent == state
