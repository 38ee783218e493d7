"""Warm containers over their life: orphans and reaping, the image behind the tag changing, the
fifo channel unavailable, the container ending with its worker process, an attempt whose container
dies, and builds through a real worker (stand-in image, buildq's own engine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from buildq.contract.job import BuildJob, parse_job
from buildq.engine.runner import Outcome, RunSpec, Watch, run_build
from buildq.engine.scheduler import Scheduler
from buildq.launchers.base import Launcher
from buildq.launchers.docker import containers
from buildq.launchers.docker.reap import STALE_FOLDER_S, remove_stale_folders
from tests.conftest_docker import DOCKER_URL, STANDIN_IMAGE
from tests.harness import base_env, client_for, flush_dbs, wait_until
from tests.standin.scenarios import hang, scenario_json, scenario_opt
from tests.test_launcher_docker import labelled, reader, start

# ---- reaping --------------------------------------------------------------------------------


@pytest.mark.docker
def test_a_left_behind_one_shot_container_is_found_and_removed(
    docker_launcher, docker_job_id, build_context, docker_api
):
    job = docker_job_id()
    start(docker_launcher(docker_warm=False), job, build_context, *scenario_opt(hang()))  # never closed
    fresh = docker_launcher()  # e.g. the worker after a restart
    assert job in fresh.find_orphans()
    fresh.kill_orphan(job)
    assert labelled(docker_api, f"buildq.job_id={job}") == []
    assert job not in fresh.find_orphans()
    fresh.kill_orphan(job)  # nothing left: no error


@pytest.mark.docker
def test_a_build_in_another_processs_warm_container_is_found_and_killed_alone(
    docker_launcher, docker_job_id, build_context, docker_api
):
    owner = docker_launcher()
    a_job, b_job = docker_job_id(), docker_job_id()
    a = start(owner, a_job, build_context, *scenario_opt(hang(after_lines=1)))
    b = start(owner, b_job, build_context, *scenario_opt(hang(after_lines=1)))
    try:
        (seen_a, _, _), (seen_b, _, _) = reader(a), reader(b)
        assert seen_a.wait(30) and seen_b.wait(30)
        reaper = docker_launcher()  # another worker process: it only sees the engine
        assert {a_job, b_job} <= set(reaper.find_orphans())
        reaper.kill_orphan(a_job)
        assert a.wait(timeout=10) == 137
        with pytest.raises(TimeoutError):
            b.wait(timeout=0.5)
        assert docker_api.inspect_container(owner.warm.box.id)["State"]["Running"] is True
        assert a_job not in reaper.find_orphans() and b_job in reaper.find_orphans()
    finally:
        a.close()
        b.close()


@pytest.mark.docker
def test_the_warm_container_of_a_gone_worker_process_is_removed(docker_launcher, docker_api) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    launcher = docker_launcher()
    labels = {
        "buildq.managed": "true", "buildq.warm": "true", "buildq.deployment": launcher.deployment,
        "buildq.worker": f"{socket.gethostname()}:{dead.pid}", "buildq.worker.started": "1",
    }  # fmt: skip
    elsewhere = {**labels, "buildq.worker": f"other-host-{uuid.uuid4().hex[:6]}:{dead.pid}"}
    ids = []
    for lab in (labels, elsewhere):
        created = docker_api.create_container(
            STANDIN_IMAGE, entrypoint=["sh", "-c", "sleep 600"], labels=lab,
            host_config=docker_api.create_host_config(network_mode="none"),
        )  # fmt: skip
        docker_api.start(created["Id"])
        ids.append(created["Id"])
    try:
        launcher.find_orphans()
        remaining = {c["Id"] for c in labelled(docker_api, "buildq.warm=true")}
        assert ids[0] not in remaining  # this host's, and its worker is gone
        assert ids[1] in remaining  # another host's: its own reaper decides
    finally:
        for cid in ids:
            try:
                docker_api.remove_container(cid, force=True)
            except Exception:  # noqa: BLE001 - removed by the test already
                pass


def test_worker_side_folders_go_once_their_container_has_ended(tmp_path: Path) -> None:
    used, ended, young = (tmp_path / f"buildq-warm-{n}" for n in ("used", "ended", "young"))
    for folder in (used, ended, young):
        folder.mkdir()
        os.mkfifo(folder / "ctl")
    (tmp_path / "unrelated").mkdir()
    reader_fd = os.open(used / "ctl", os.O_RDONLY | os.O_NONBLOCK)  # a runner reads it
    try:
        later = time.time() + STALE_FOLDER_S + 1
        os.utime(young, (later, later))
        assert remove_stale_folders(str(tmp_path), now=later) == ["buildq-warm-ended"]
    finally:
        os.close(reader_fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "buildq-warm-used",
        "buildq-warm-young",
        "unrelated",
    ]


class _OnLine(Watch):
    def __init__(self, on_line: Any = None) -> None:
        self.on_line = on_line

    def line(self, line: str, status: Any) -> None:
        if self.on_line is not None:
            self.on_line(line, status)


def run_once(job: BuildJob, launcher: Launcher, *, timeout_s: float, on_line: Any = None) -> Outcome:
    """One buildctl run of ``job`` through ``launcher`` (as the lifecycle runs it), on a scheduler
    of its own."""
    scheduler = Scheduler()
    try:
        spec = RunSpec(number=1, daemon="tcp://127.0.0.1:1234", launcher=launcher, scheduler=scheduler,
                       timeout_s=timeout_s)  # fmt: skip
        return run_build(job, spec, _OnLine(on_line))
    finally:
        scheduler.stop()


# ---- life cycle -------------------------------------------------------------------------------


@pytest.fixture
def own_tag(docker_api: Any) -> Any:
    """A tag of the stand-in image for this test alone (never moves the shared tag)."""
    repo, tag = "buildq/buildctl-standin", f"t{uuid.uuid4().hex[:8]}"
    docker_api.tag(STANDIN_IMAGE, repo, tag=tag)
    yield f"{repo}:{tag}"
    try:
        docker_api.remove_image(f"{repo}:{tag}", force=True)
    except Exception:  # noqa: BLE001 - best effort
        pass


@pytest.mark.docker
def test_a_new_image_behind_the_tag_gets_a_new_warm_container(
    docker_launcher, docker_job_id, build_context, docker_api, own_tag
):
    now = [1000.0]
    launcher = docker_launcher(buildctl_image=own_tag, clock=lambda: now[0])
    with start(launcher, docker_job_id(), build_context) as build:
        assert build.wait(30) == 0
        first = build.box
    # the same content under a new image id, then the tag moves to it
    scratch = docker_api.create_container(own_tag, entrypoint=["true"])
    repo, tag = own_tag.split(":")
    docker_api.commit(scratch["Id"], repository=repo, tag=tag, changes=["LABEL buildq.test.rebuilt=1"])
    docker_api.remove_container(scratch["Id"])
    with start(launcher, docker_job_id(), build_context) as build:
        assert build.wait(30) == 0 and build.box is first  # not looked at again yet
    now[0] += 31
    with start(launcher, docker_job_id(), build_context) as build:
        assert build.wait(30) == 0
        second = build.box
    assert second.id != first.id and second.image_id != first.image_id
    assert wait_until(lambda: not docker_api.containers(all=True, filters={"id": first.id}), timeout=30)


@pytest.mark.docker
def test_without_a_shared_folder_the_launcher_uses_exec_and_remembers(
    docker_launcher, docker_job_id, build_context, monkeypatch, caplog
):
    monkeypatch.setattr(containers, "_read_ready", lambda fd, timeout_s: "")  # the token never comes back
    launcher = docker_launcher("auto")
    with caplog.at_level("INFO", logger="buildq.launchers.docker"):
        with start(launcher, docker_job_id(), build_context) as build:
            assert build.wait(30) == 0 and build.read_metadata() is not None
    assert launcher.warm.box.channel == "exec" and launcher.channel == "exec"
    assert "exec channel (the container does not see" in caplog.text


@pytest.mark.docker
def test_the_warm_container_ends_with_its_worker_process(docker_api, build_context, tmp_path) -> None:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.conftest_docker import docker_settings_for
        from tests.test_launcher_docker import start
        from buildq.launchers.docker import DockerLauncher
        from pathlib import Path
        settings = docker_settings_for({DOCKER_URL!r}, context_roots=[{str(tmp_path)!r}])
        launcher = DockerLauncher(settings, state_dir={str(tmp_path / "state")!r})
        build = start(launcher, "gone-1", Path({str(build_context)!r}))
        build.wait(30)
        build.close()
        print(launcher.warm.box.id, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        container = proc.stdout.readline().strip() if proc.stdout else ""
        assert docker_api.inspect_container(container)["State"]["Running"] is True
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up code runs
        proc.wait()
    assert wait_until(lambda: not docker_api.containers(all=True, filters={"id": container}), timeout=30)


@pytest.mark.docker
@pytest.mark.parametrize("channel", ["fifo", "exec"])
def test_an_attempt_whose_container_dies_fails_transient(docker_launcher, docker_api, context_dir, channel):
    launcher = docker_launcher(channel)
    job = parse_job(
        {"context": str(context_dir), "tags": ["127.0.0.1:5000/demo/app:1"],
         "build_args": {"STANDIN_SCENARIO": scenario_json(hang(after_lines=2))}}
    )  # fmt: skip
    killed: list[str] = []

    def kill_container_at_first_line(line: str, status: object) -> None:
        if not killed:
            killed.append(launcher.warm.box.id)
            docker_api.kill(killed[0])  # the container dies under the running build

    outcome = run_once(job, launcher, timeout_s=60, on_line=kill_container_at_first_line)
    assert outcome.outcome == "failed" and outcome.failure is not None
    assert outcome.failure.transient and outcome.failure.reason == "docker_error"
    assert "ended during the build" in outcome.failure.message


@pytest.mark.docker
def test_a_time_limit_kills_the_build_not_the_warm_container(docker_launcher, docker_api, context_dir):
    launcher = docker_launcher()
    job = parse_job(
        {"context": str(context_dir), "tags": ["127.0.0.1:5000/demo/app:1"], "timeout_s": 1,
         "build_args": {"STANDIN_SCENARIO": scenario_json(hang(after_lines=2))}}
    )  # fmt: skip
    outcome = run_once(job, launcher, timeout_s=1)
    assert outcome.outcome == "timeout" and outcome.exit_code == 137
    box = launcher.warm.box
    assert docker_api.inspect_container(box.id)["State"]["Running"] is True
    plain = parse_job({"context": str(context_dir), "tags": ["127.0.0.1:5000/demo/app:1"]})
    again = run_once(plain, launcher, timeout_s=60)
    assert again.outcome == "succeeded" and launcher.warm.box is box


# ---- through a worker -------------------------------------------------------------------------


@pytest.mark.docker
def test_builds_through_a_worker_share_its_warm_containers(
    docker_url, start_worker, context_dir, tmp_path, docker_api
):
    env = base_env(
        10, f"t{uuid.uuid4().hex[:8]}", BUILDQ_LAUNCHER="docker", BUILDQ_BUILDCTL_IMAGE=STANDIN_IMAGE,
        BUILDQ_DOCKER_URL=docker_url, BUILDQ_DOCKER_NETWORK="none", BUILDQ_CONTEXT_ROOTS=str(tmp_path),
        BUILDQ_SECRET_ENV="MY_TOKEN",
    )  # fmt: skip
    flush_dbs(env)
    worker = start_worker({**env, "MY_TOKEN": "tok-value-1234"}, concurrency=2)
    client = client_for(env)
    jobs = [
        {"context": str(context_dir), "tags": [f"127.0.0.1:5000/demo/w{i}:1"],
         "secrets": [{"id": "tok", "env": "MY_TOKEN"}]}
        for i in range(4)
    ]  # fmt: skip
    records = [h.wait(timeout=120) for h in [client.submit(j) for j in jobs]]
    assert [r["state"] for r in records] == ["succeeded"] * 4, records
    assert all(r["image"]["digest"].startswith("sha256:") for r in records)
    pool = worker.children()
    workers = {f"{socket.gethostname()}:{pid}" for pid in pool}
    warm = [c for c in labelled(docker_api, "buildq.warm=true") if c["Labels"]["buildq.worker"] in workers]
    assert 1 <= len(warm) <= 2 and all(c["State"] == "running" for c in warm)
    worker.stop()
    assert wait_until(lambda: not [c for c in labelled(docker_api, "buildq.warm=true") if c["Id"] in
                                   {w["Id"] for w in warm}], timeout=30)  # fmt: skip
    # each pool process removed its container and its folder in /dev/shm as it stopped
    folders = [n for n in os.listdir("/dev/shm/buildq-docker") if any(f"-{pid}-" in n for pid in pool)]
    assert folders == []
