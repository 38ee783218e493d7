"""The docker launcher against a real engine (.ci/dockerd.sh) and the busybox-sh stand-in image.

Pure helpers (line splitting, tar reading, names, lazy client) are tested without the engine.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit.solvestatus import parse_line
from buildq.errors import PermanentBuildError, TransientBuildError
from buildq.launchers.base import BuildPaths, LaunchSpec
from buildq.launchers.docker import DockerLauncher, container_name, file_from_tar, split_lines
from tests.conftest_docker import docker_settings_for
from tests.standin.scenarios import fail, hang, scenario_opt, succeed

# ---- pure helpers -------------------------------------------------------------------------


def test_split_lines_joins_partial_chunks_and_split_utf8() -> None:
    data = "first\nsecond ünïcode\nthird".encode()
    chunks = [data[:3], data[3:14], data[14:15], data[15:]]  # cuts inside "ü"
    assert list(split_lines(iter(chunks))) == ["first", "second ünïcode", "third"]


def test_split_lines_ends_without_empty_tail() -> None:
    assert list(split_lines(iter([b"a\r\n", b"b\n"]))) == ["a", "b"]


def test_file_from_tar_returns_the_single_file() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("metadata.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert file_from_tar(buf.getvalue()) == b"{}"


def test_container_name_is_valid_and_unique() -> None:
    a, b = container_name("job/with:odd chars"), container_name("job/with:odd chars")
    assert a != b
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", a)
    assert a.startswith("buildq-job-with-odd-chars-")


def test_launcher_creation_does_not_touch_the_engine() -> None:
    launcher = DockerLauncher(docker_settings_for("unix:///nonexistent/docker.sock"))
    paths = launcher.prepare("j", "/w/ctx", None)
    assert paths == BuildPaths("/buildq/context", None, "/buildq/out/metadata.json")


def test_unreachable_engine_is_transient() -> None:
    launcher = DockerLauncher(docker_settings_for("unix:///nonexistent/docker.sock"))
    paths = launcher.prepare("j", None, None)
    with pytest.raises(TransientBuildError) as err:
        launcher.start(LaunchSpec(job_id="j", argv=["--version"]), paths)
    assert err.value.reason == "docker_unavailable"


# ---- against the engine -------------------------------------------------------------------


def build_argv(paths: BuildPaths, *extra: str, name: str = "127.0.0.1:5000/demo/app:1") -> list[str]:
    return [
        "--addr", "tcp://127.0.0.1:1234", "build", "--frontend", "dockerfile.v0",
        "--local", f"context={paths.context_dir}", "--local", f"dockerfile={paths.dockerfile_dir}",
        "--output", f"type=image,name={name},push=true", "--progress=rawjson",
        "--metadata-file", paths.metadata_file, *extra,
    ]  # fmt: skip


def start(launcher: DockerLauncher, job: str, ctx: Path, *extra: str, **spec: Any) -> Any:
    paths = launcher.prepare(job, str(ctx), str(ctx))
    return launcher.start(
        LaunchSpec(
            job_id=job, argv=build_argv(paths, *extra), context_dir=str(ctx), dockerfile_dir=str(ctx), **spec
        ),
        paths,
    )


def labelled(api: Any, job: str) -> list[dict[str, Any]]:
    return list(api.containers(all=True, filters={"label": [f"buildq.job_id={job}"]}))


def first_line_then_rest(build: Any) -> tuple[threading.Event, list[str], threading.Thread]:
    seen, lines = threading.Event(), []

    def read() -> None:
        for line in build.lines():
            lines.append(line)
            seen.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return seen, lines, thread


@pytest.mark.docker
def test_success_returns_rc0_progress_and_metadata(docker_settings, docker_job_id, build_context) -> None:
    launcher = DockerLauncher(docker_settings)
    job = docker_job_id()
    with start(launcher, job, build_context) as build:
        lines = list(build.lines())
        assert build.wait(30) == 0
        metadata = build.read_metadata()
    assert lines and all(parse_line(line) is not None for line in lines)
    assert metadata is not None
    assert metadata["containerimage.digest"].startswith("sha256:")
    assert metadata["image.name"] == "127.0.0.1:5000/demo/app:1"


@pytest.mark.docker
def test_container_gets_labels_env_and_readonly_binds(
    docker_settings, docker_job_id, build_context, docker_api
):
    launcher = DockerLauncher(docker_settings)
    job = docker_job_id()
    build = start(launcher, job, build_context, *scenario_opt(hang()), env={"BUILDKIT_HOST": "tcp://x:1"})
    try:
        seen, _lines, _ = first_line_then_rest(build)
        assert seen.wait(30)
        info = docker_api.inspect_container(build.container_id)
        assert info["Config"]["Labels"]["buildq.job_id"] == job
        assert info["Config"]["Labels"]["buildq.managed"] == "true"
        assert "BUILDKIT_HOST=tcp://x:1" in info["Config"]["Env"]
        assert info["HostConfig"]["NetworkMode"] == "none"
        binds = {m["Destination"]: m for m in info["Mounts"] if m["Type"] == "bind"}
        assert set(binds) == {"/buildq/context", "/buildq/dockerfile"}
        assert all(m["RW"] is False for m in binds.values())
        # The build sees its context through the bind and cannot write to it.
        listing = exec_in(docker_api, build.container_id, ["ls", "/buildq/context"])
        assert listing == (0, "Dockerfile\nhello.txt\n")
        code, out = exec_in(docker_api, build.container_id, ["touch", "/buildq/context/new"])
        assert code != 0 and "Read-only file system" in out
        assert not (build_context / "new").exists()
    finally:
        build.close()


def exec_in(api: Any, container: str, cmd: list[str]) -> tuple[int, str]:
    exec_id = api.exec_create(container, cmd, stdout=True, stderr=True)["Id"]
    out = api.exec_start(exec_id).decode()
    return api.exec_inspect(exec_id)["ExitCode"], out


@pytest.mark.docker
def test_stderr_lines_arrive_while_container_runs(docker_settings, docker_job_id, build_context, docker_api):
    launcher = DockerLauncher(docker_settings)
    build = start(launcher, docker_job_id(), build_context, *scenario_opt(succeed(sleep_s=2)))
    try:
        seen, lines, reader = first_line_then_rest(build)
        assert seen.wait(30), "no stderr line arrived"
        assert docker_api.inspect_container(build.container_id)["State"]["Running"] is True
        assert parse_line(lines[0]) is not None
        assert build.wait(60) == 0
        reader.join(10)
        assert len(lines) == 39  # the whole ctx_oci_rawjson_cold capture
    finally:
        build.close()


@pytest.mark.docker
def test_failure_returns_rc1_and_error_line_last(docker_settings, docker_job_id, build_context) -> None:
    text = 'failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 2'
    launcher = DockerLauncher(docker_settings)
    with start(launcher, docker_job_id(), build_context, *scenario_opt(fail(text, after_lines=3))) as build:
        lines = list(build.lines())
        assert build.wait(30) == 1
        assert build.read_metadata() is None
    assert lines[-1] == f"error: {text}"
    assert len(lines) == 4


@pytest.mark.docker
def test_kill_stops_a_hanging_container_within_2s(docker_settings, docker_job_id, build_context) -> None:
    launcher = DockerLauncher(docker_settings)
    with start(launcher, docker_job_id(), build_context, *scenario_opt(hang(after_lines=2))) as build:
        seen, _lines, _ = first_line_then_rest(build)
        assert seen.wait(30)
        with pytest.raises(TimeoutError):
            build.wait(timeout=0.5)
        killers = [threading.Thread(target=build.kill) for _ in range(3)]
        for k in killers:
            k.start()
        for k in killers:
            k.join()
        assert build.wait(timeout=2) == 137  # SIGKILL
        build.kill()  # idempotent after exit


@pytest.mark.docker
def test_close_removes_the_container_and_is_idempotent(
    docker_settings, docker_job_id, build_context, docker_api
):
    launcher = DockerLauncher(docker_settings)
    job = docker_job_id()
    build = start(launcher, job, build_context, *scenario_opt(hang()))
    assert len(labelled(docker_api, job)) == 1
    mounts = docker_api.inspect_container(build.container_id)["Mounts"]
    (volume,) = [m["Name"] for m in mounts if m["Destination"] == "/buildq/out"]
    build.close()
    build.close()
    assert labelled(docker_api, job) == []
    assert volume not in [v["Name"] for v in docker_api.volumes()["Volumes"] or []]


@pytest.mark.docker
def test_missing_image_that_cannot_be_pulled_is_permanent(docker_url, docker_job_id, build_context) -> None:
    image = "buildq/no-such-image:never"
    launcher = DockerLauncher(docker_settings_for(docker_url, buildctl_image=image, docker_pull_timeout_s=60))
    with pytest.raises(PermanentBuildError) as err:
        start(launcher, docker_job_id(), build_context)
    assert err.value.reason == "image_pull_failed"
    assert image in err.value.message


@pytest.mark.docker
def test_find_orphans_sees_a_left_behind_container(docker_settings, docker_job_id, build_context, docker_api):
    job = docker_job_id()
    start(DockerLauncher(docker_settings), job, build_context, *scenario_opt(hang()))  # never closed
    fresh = DockerLauncher(docker_settings)  # e.g. the worker after a restart
    assert job in fresh.find_orphans()
    fresh.kill_orphan(job)
    assert labelled(docker_api, job) == []
    assert job not in fresh.find_orphans()
    fresh.kill_orphan(job)  # nothing left: no error
