"""The docker launcher against a real engine (.ci/dockerd.sh) and the busybox-sh stand-in image.

Warm builds run in one runner container per launcher, over both channels (``fifo``: a folder
shared with the engine; ``exec``: one ``docker exec`` per build); builds whose context lies outside
``BUILDQ_CONTEXT_ROOTS`` get a one-shot container. Pure helpers are in tests/test_docker_plan.py.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit.progress import parse_line
from buildq.errors import PermanentBuildError, TransientBuildError
from buildq.launchers.base import BuildPaths, LaunchSpec
from buildq.launchers.docker import DockerLauncher
from buildq.launchers.docker.reap import top
from tests.conftest_docker import docker_settings_for
from tests.standin.scenarios import fail, hang, scenario_opt, succeed

CHANNELS = ["fifo", "exec"]


def test_launcher_creation_does_not_touch_the_engine(tmp_path: Path) -> None:
    (tmp_path / "ctx").mkdir()
    launcher = DockerLauncher(
        docker_settings_for("unix:///nonexistent/docker.sock", context_roots=[str(tmp_path)])
    )
    paths = launcher.prepare("j", str(tmp_path / "ctx"), str(tmp_path / "ctx"), ["tok"])
    run = "/buildq/run/b/j.1"
    assert paths == BuildPaths(
        str(tmp_path / "ctx"), str(tmp_path / "ctx"), f"{run}/metadata.json", (("tok", f"{run}/secret-0"),)
    )
    outside = launcher.prepare("j", "/w/ctx", None)
    assert outside == BuildPaths("/buildq/context", None, "/buildq/run/b/j.2/metadata.json")


def test_unreachable_engine_is_transient() -> None:
    launcher = DockerLauncher(docker_settings_for("unix:///nonexistent/docker.sock"))
    paths = launcher.prepare("j", None, None)
    with pytest.raises(TransientBuildError) as err:
        launcher.start(LaunchSpec(job_id="j", argv=["--version"]), paths)
    assert err.value.reason == "docker_unavailable"


# ---- against the engine -------------------------------------------------------------------


def start(
    launcher: DockerLauncher, job: str, ctx: Path, *extra: str, secrets: dict[str, str] | None = None
) -> Any:
    paths = launcher.prepare(job, str(ctx), str(ctx), list(secrets or {}))
    argv = [
        "--addr", "tcp://127.0.0.1:1234", "build", "--frontend", "dockerfile.v0",
        "--local", f"context={paths.context_dir}", "--local", f"dockerfile={paths.dockerfile_dir}",
        "--output", "type=image,name=127.0.0.1:5000/demo/app:1,push=true", "--progress=rawjson",
        "--metadata-file", paths.metadata_file, *extra,
    ]  # fmt: skip
    for sid, path in paths.secret_files:
        argv += ["--secret", f"id={sid},src={path}"]
    spec = LaunchSpec(
        job_id=job, argv=argv, context_dir=str(ctx), dockerfile_dir=str(ctx), secrets=secrets or {}
    )
    return launcher.start(spec, paths)


def reader(build: Any) -> tuple[threading.Event, list[str], threading.Thread]:
    seen, lines = threading.Event(), []

    def read() -> None:
        for line in build.lines():
            lines.append(line)
            seen.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return seen, lines, thread


def exec_in(api: Any, container: str, cmd: list[str]) -> tuple[int, str]:
    exec_id = api.exec_create(container, cmd, stdout=True, stderr=True)["Id"]
    out = api.exec_start(exec_id).decode()
    return api.exec_inspect(exec_id)["ExitCode"], out


def labelled(api: Any, label: str) -> list[dict[str, Any]]:
    return list(api.containers(all=True, filters={"label": [label]}))


@pytest.mark.docker
@pytest.mark.parametrize("channel", CHANNELS)
def test_warm_builds_share_one_container(docker_launcher, docker_job_id, build_context, docker_api, channel):
    launcher = docker_launcher(channel)
    results = []
    for _ in range(2):
        with start(launcher, docker_job_id(), build_context) as build:
            lines = list(build.lines())
            results.append((build.wait(30), build.read_metadata(), lines, build.box.id))
    (rc1, meta1, lines1, box1), (rc2, meta2, _, box2) = results
    assert rc1 == rc2 == 0 and box1 == box2 == launcher.warm.box.id
    assert lines1 and all(parse_line(line) is not None for line in lines1)
    assert meta1 is not None and meta1["containerimage.digest"].startswith("sha256:")
    assert meta1["image.name"] == "127.0.0.1:5000/demo/app:1" and meta2 is not None
    assert launcher.warm.box.channel == channel
    info = docker_api.inspect_container(box1)
    labels = info["Config"]["Labels"]
    assert labels["buildq.managed"] == "true" and labels["buildq.warm"] == "true"
    assert labels["buildq.worker"].endswith(f":{os.getpid()}") and "buildq.job_id" not in labels
    binds = {m["Destination"]: m for m in info["Mounts"] if m["Type"] == "bind"}
    root = str(build_context.parent)
    assert binds[root]["RW"] is False and binds[root]["Source"] == root
    assert ("/buildq/run" in binds) is (channel == "fifo")
    assert info["HostConfig"]["NetworkMode"] == "none" and info["HostConfig"]["AutoRemove"] is True


@pytest.mark.docker
@pytest.mark.parametrize("channel", CHANNELS)
def test_stderr_lines_arrive_while_buildctl_runs(docker_launcher, docker_job_id, build_context, channel):
    with start(
        docker_launcher(channel), docker_job_id(), build_context, *scenario_opt(succeed(sleep_s=2))
    ) as build:
        seen, lines, thread = reader(build)
        assert seen.wait(30), "no stderr line arrived"
        with pytest.raises(TimeoutError):
            build.wait(0.2)  # buildctl sleeps halfway through the capture
        assert parse_line(lines[0]) is not None
        assert build.wait(60) == 0
        thread.join(10)
        assert len(lines) == 39  # the whole ctx_oci_rawjson_cold capture


@pytest.mark.docker
@pytest.mark.parametrize("channel", CHANNELS)
def test_failure_returns_rc1_and_error_line_last(docker_launcher, docker_job_id, build_context, channel):
    text = 'failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 2'
    launcher = docker_launcher(channel)
    with start(launcher, docker_job_id(), build_context, *scenario_opt(fail(text, after_lines=3))) as build:
        lines = list(build.lines())
        assert build.wait(30) == 1
        assert build.read_metadata() is None
    assert lines[-1] == f"error: {text}" and len(lines) == 4


@pytest.mark.docker
@pytest.mark.parametrize("channel", CHANNELS)
def test_kill_of_one_build_leaves_the_other_and_the_container(
    docker_launcher, docker_job_id, build_context, docker_api, channel
):
    launcher = docker_launcher(channel)
    a = start(launcher, docker_job_id(), build_context, *scenario_opt(hang(after_lines=2)))
    b = start(launcher, docker_job_id(), build_context, *scenario_opt(hang(after_lines=2)))
    try:
        assert a.box is b.box
        (seen_a, _, _), (seen_b, _, _) = reader(a), reader(b)
        assert seen_a.wait(30) and seen_b.wait(30)
        killers = [threading.Thread(target=a.kill) for _ in range(3)]
        for k in killers:
            k.start()
        for k in killers:
            k.join()
        assert a.wait(timeout=2) == 137  # SIGKILL
        a.kill()  # idempotent after exit
        with pytest.raises(TimeoutError):
            b.wait(timeout=0.5)  # the other build runs on
        assert docker_api.inspect_container(a.box.id)["State"]["Running"] is True
        b.kill()
        assert b.wait(timeout=2) == 137
    finally:
        a.close()
        b.close()
    assert not a.box.dead and a.box is launcher.warm.box


@pytest.mark.docker
@pytest.mark.parametrize("channel", CHANNELS)
def test_a_dead_warm_container_fails_its_build_and_is_replaced(
    docker_launcher, docker_job_id, build_context, docker_api, channel
):
    launcher = docker_launcher(channel)
    build = start(launcher, docker_job_id(), build_context, *scenario_opt(hang(after_lines=2)))
    first = build.box
    seen, _, _ = reader(build)
    assert seen.wait(30)
    docker_api.kill(first.id)  # the container dies under a running build
    with pytest.raises(TransientBuildError) as err:
        build.wait(timeout=30)
    assert err.value.reason == "docker_error"
    build.close()
    with start(launcher, docker_job_id(), build_context) as again:
        assert again.wait(30) == 0
        second = again.box
    assert second.id != first.id
    docker_api.kill(second.id)  # dies while idle: the next build notices at once and starts anew
    with start(launcher, docker_job_id(), build_context) as third:
        assert third.wait(30) == 0 and third.box.id not in (first.id, second.id)


@pytest.mark.docker
def test_context_outside_the_roots_gets_a_one_shot_container(
    docker_launcher, docker_job_id, build_context, docker_api, caplog
):
    launcher = docker_launcher(context_roots=["/srv/elsewhere"])
    job = docker_job_id()
    with caplog.at_level(logging.INFO, logger="buildq.launchers.docker"):
        build = start(launcher, job, build_context, *scenario_opt(hang()))
    try:
        assert "outside BUILDQ_CONTEXT_ROOTS (/srv/elsewhere)" in caplog.text and job in caplog.text
        assert launcher.warm.box is None  # no warm container was needed
        (container,) = labelled(docker_api, f"buildq.job_id={job}")
        assert container["Id"] == build.box.id
        info = docker_api.inspect_container(build.box.id)
        binds = {m["Destination"]: m for m in info["Mounts"] if m["Type"] == "bind"}
        assert {"/buildq/context", "/buildq/dockerfile"} <= set(binds)
        assert binds["/buildq/context"]["RW"] is False
        assert exec_in(docker_api, build.box.id, ["ls", "/buildq/context"]) == (0, "Dockerfile\nhello.txt\n")
        code, out = exec_in(docker_api, build.box.id, ["touch", "/buildq/context/new"])
        assert code != 0 and "Read-only file system" in out
    finally:
        build.close()
        build.close()
    assert labelled(docker_api, f"buildq.job_id={job}") == []


@pytest.mark.docker
def test_warm_off_runs_each_build_in_its_own_container(
    docker_launcher, docker_job_id, build_context, docker_api
):
    launcher = docker_launcher(docker_warm=False)
    ids = []
    for _ in range(2):
        job = docker_job_id()
        with start(launcher, job, build_context) as build:
            assert build.wait(30) == 0 and build.read_metadata() is not None
            ids.append(build.box.id)
        assert labelled(docker_api, f"buildq.job_id={job}") == []
    assert ids[0] != ids[1] and launcher.warm.box is None


@pytest.mark.docker
@pytest.mark.parametrize(("channel", "roots"), [("fifo", None), ("exec", None), ("auto", ["/srv/elsewhere"])])
def test_secrets_are_private_files_never_container_environment(
    docker_launcher, docker_job_id, build_context, docker_api, channel, roots
):
    value = "s3cr3t-Value-9f27"
    launcher = docker_launcher(channel, **({"context_roots": roots} if roots else {}))
    build = start(launcher, docker_job_id(), build_context, *scenario_opt(hang()), secrets={"npm": value})
    try:
        seen, _, _ = reader(build)
        assert seen.wait(30)
        (path,) = [a.split("src=")[1] for a in build_args(docker_api, build.box.id) if "src=" in a]
        assert exec_in(docker_api, build.box.id, ["cat", path]) == (0, value)
        assert exec_in(docker_api, build.box.id, ["stat", "-c", "%a", path]) == (0, "600\n")
        seen_by_engine = [docker_api.inspect_container(build.box.id), top(docker_api, build.box.id)]
        if channel == "exec":
            seen_by_engine.append(docker_api.exec_inspect(build.exec_id))
        assert value not in repr(seen_by_engine)
    finally:
        build.close()
    if roots is None:  # the warm container stays: the file went with the build
        assert exec_in(docker_api, build.box.id, ["ls", path])[0] != 0


def build_args(api: Any, container: str) -> list[str]:
    """The argv of the buildctl running in the container, as the engine shows it (whole lines)."""
    seen = top(api, container)
    col = [t.upper() for t in seen["Titles"]].index("COMMAND")
    return next(row[col] for row in seen["Processes"] if "/usr/bin/buildctl " in row[col]).split()


@pytest.mark.docker
def test_missing_image_that_cannot_be_pulled_is_permanent(
    docker_launcher, docker_job_id, build_context
) -> None:
    image = "buildq/no-such-image:never"
    launcher = docker_launcher(buildctl_image=image, docker_pull_timeout_s=60)
    with pytest.raises(PermanentBuildError) as err:
        start(launcher, docker_job_id(), build_context)
    assert err.value.reason == "image_pull_failed"
    assert image in err.value.message
