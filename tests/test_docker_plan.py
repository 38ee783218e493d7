"""The docker launcher's pure parts, over data: paths, command file, secrets archive, runner output,
``docker top`` answers, the warm/one-shot decision, the warm slot's life cycle, worker ownership."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from typing import Any

import pytest

from buildq.launchers.docker.containers import WarmSlot, process_started, worker_gone, worker_labels
from buildq.launchers.docker.plan import (
    command_file,
    container_name,
    inside,
    job_of,
    jobs_in_listing,
    jobs_in_top,
    metadata_path,
    parse_exec_output,
    run_dir,
    run_id,
    run_of,
    secret_path,
    secrets_tar,
    split_lines,
    warm_name,
    warm_plan,
)


def test_split_lines_joins_partial_chunks_and_split_utf8() -> None:
    data = "first\nsecond ünïcode\nthird".encode()
    chunks = [data[:3], data[3:14], data[14:15], data[15:]]  # cuts inside "ü"
    assert list(split_lines(iter(chunks))) == ["first", "second ünïcode", "third"]


def test_split_lines_ends_without_empty_tail() -> None:
    assert list(split_lines(iter([b"a\r\n", b"b\n"]))) == ["a", "b"]


def test_names_are_valid_and_unique() -> None:
    a, b = container_name("job/with:odd chars"), container_name("job/with:odd chars")
    assert a != b and a.startswith("buildq-job-with-odd-chars-")
    w = warm_name("host.example:x", 42)
    assert w.startswith("buildq-warm-host.example-x-42-") and w != warm_name("host.example:x", 42)


def test_run_paths_round_trip() -> None:
    run = run_id("job.with.dots", 7)
    assert run == "job.with.dots.7"
    assert metadata_path(run) == "/buildq/run/b/job.with.dots.7/metadata.json"
    assert secret_path(run, 1) == "/buildq/run/b/job.with.dots.7/secret-1"
    assert run_dir(run, "/dev/shm/x") == "/dev/shm/x/b/job.with.dots.7"
    assert run_of(metadata_path(run)) == run
    assert job_of(run) == "job.with.dots"
    assert run_id("a/../b", 1) == "a-..-b.1"  # never a path


def test_command_file_gives_the_shell_the_exact_arguments_and_environment(tmp_path) -> None:
    argv = ["build", "--opt", 'build-arg:X=it\'s "quoted" $HOME `x` \\ ;', "--opt", "label:a=b\nc", "", "ü"]
    path = tmp_path / "cmd"
    path.write_bytes(command_file(argv, {"BUILDKIT_HOST": "tcp://h:1", "ODD": "a'b $c"}))
    out = subprocess.run(
        ["sh", "-c", '. "$0"; printf "%s\\0" "$BUILDKIT_HOST" "$ODD" "$@"', str(path)],
        capture_output=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout  # fmt: skip
    assert out.decode().split("\0")[:-1] == ["tcp://h:1", "a'b $c", *argv]


def test_command_file_rejects_a_bad_variable_name() -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        command_file([], {"A B": "x"})


def test_secrets_tar_holds_private_files() -> None:
    data = secrets_tar({"secret-0": b"v1", "secret-1": b"\x00bin"})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar}
        assert {n: (m.mode, tar.extractfile(m).read()) for n, m in members.items()} == {  # type: ignore[union-attr]
            "secret-0": (0o600, b"v1"),
            "secret-1": (0o600, b"\x00bin"),
        }


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        (b'rc 0\n{"containerimage.digest": "sha256:ab"}', (0, {"containerimage.digest": "sha256:ab"})),
        (b"rc 137\n", (137, None)),
        (b"rc 1\nnot json", (1, None)),
        (b"rc 0\n[1]", (0, None)),
        (b"", (None, None)),
        (b"garbage\n{}", (None, None)),
    ],
)
def test_parse_exec_output(stdout: bytes, expected: tuple[Any, Any]) -> None:
    assert parse_exec_output(stdout) == expected


def test_jobs_in_top_finds_buildctl_runs_only() -> None:
    top = {
        "Titles": ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"],
        "Processes": [
            ["root", "1", "0", "0", "10:00", "?", "00:00:00", "/bin/sh -c R=/buildq/run ... serve"],
            ["root", "9", "1", "0", "10:00", "?", "00:00:00",
             "buildctl build --progress=rawjson --metadata-file /buildq/run/b/job.a.1/metadata.json"],
            ["root", "10", "1", "0", "10:00", "?", "00:00:00",
             "buildctl build --metadata-file /buildq/run/b/other-7.12/metadata.json --secret id=x"],
            ["root", "11", "1", "0", "10:00", "?", "00:00:00", "cat /buildq/run/b/nope.3/metadata.json"],
            ["root", "12", "1", "0", "10:00", "?", "00:00:00",
             "buildctl build --metadata-file /buildq/run/b/job.a.2/metadata.json"],
        ],
    }  # fmt: skip
    assert jobs_in_top(top) == ["job.a", "other-7"]
    assert jobs_in_top({"Titles": [], "Processes": None}) == []


def test_jobs_in_listing_reads_the_runners_runs() -> None:
    listing = b"job.a.1\nother-7.12\njob.a.2\n\nnot a run\n/buildq/run/b/x.1\nno-number\n"
    assert jobs_in_listing(listing) == ["job.a", "other-7"]
    assert jobs_in_listing(b"") == []


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [("/srv/ctx", "/srv/ctx", True), ("/srv/ctx/app", "/srv/ctx/", True), ("/srv/ctx2", "/srv/ctx", False),
     ("/srv", "/srv/ctx", False), ("/anything", "/", True)],
)  # fmt: skip
def test_inside(path: str, root: str, expected: bool) -> None:
    assert inside(path, root) is expected


def test_warm_plan_says_why_a_build_needs_a_one_shot_container() -> None:
    roots = ["/srv/a", "/srv/b"]
    assert warm_plan("/srv/a/app", "/srv/a/app/sub", roots, warm=True) is None
    assert warm_plan(None, None, [], warm=True) is None  # git context: nothing to mount
    assert warm_plan("/srv/a/app", None, roots, warm=False) == "BUILDQ_DOCKER_WARM is off"
    assert warm_plan("/tmp/x", "/tmp/x", roots, warm=True) == (
        "context /tmp/x is outside BUILDQ_CONTEXT_ROOTS (/srv/a, /srv/b)"
    )
    assert warm_plan("/srv/a/app", "/etc/x", roots, warm=True) == (
        "Dockerfile folder /etc/x is outside BUILDQ_CONTEXT_ROOTS (/srv/a, /srv/b)"
    )
    assert warm_plan("/srv/a", "/srv/a", [], warm=True) == (
        "context /srv/a is outside BUILDQ_CONTEXT_ROOTS (none set)"
    )


# ---- the warm slot, with stand-in containers and an injected clock ----------------------------


class FakeBox:
    made = 0

    def __init__(self, image_id: str) -> None:
        FakeBox.made += 1
        self.name = f"box{FakeBox.made}"
        self.image_id, self.pid, self.refs = image_id, os.getpid(), 0
        self.dead = self.closed = False

    def close(self) -> None:
        self.closed = True


class Slot:
    def __init__(self) -> None:
        self.now = 1000.0
        self.image = "sha256:one"
        self.slot = WarmSlot(
            lambda: FakeBox(self.image), lambda: self.image, clock=lambda: self.now, recheck_s=30
        )  # type: ignore[arg-type,return-value]


def test_warm_slot_shares_one_container_and_replaces_a_dead_one() -> None:
    s = Slot()
    a = s.slot.acquire()
    b = s.slot.acquire()
    assert a is b and a.refs == 2
    s.slot.release(a)
    s.slot.release(b)
    a.dead = True
    c = s.slot.acquire()
    assert c is not a and a.closed and not c.closed


def test_warm_slot_sees_a_new_image_only_after_the_recheck_interval() -> None:
    s = Slot()
    a = s.slot.acquire()
    s.image = "sha256:two"
    s.now += 29
    assert s.slot.acquire() is a  # not checked yet
    s.now += 2
    b = s.slot.acquire()
    assert b is not a and b.image_id == "sha256:two"
    assert not a.closed  # two builds still use it
    s.slot.release(a)
    assert not a.closed
    s.slot.release(a)
    assert a.closed  # the last build closed: the replaced container goes
    s.slot.release(b)
    assert not b.closed  # the current one stays warm


def test_warm_slot_never_closes_the_parents_container_in_a_forked_child() -> None:
    s = Slot()
    a = s.slot.acquire()
    s.slot.release(a)
    a.pid = os.getpid() + 1  # as seen from a forked child
    b = s.slot.acquire()
    assert b is not a and not a.closed
    s.slot.close()
    assert b.closed


def test_worker_labels_and_who_is_gone() -> None:
    mine = worker_labels()
    host, _, pid = mine["buildq.worker"].rpartition(":")
    assert int(pid) == os.getpid() and mine["buildq.worker.started"] == process_started(os.getpid())
    assert not worker_gone(mine)
    assert worker_gone({**mine, "buildq.worker.started": "1"})  # same pid, another process
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert worker_gone({"buildq.worker": f"{host}:{proc.pid}", "buildq.worker.started": "5"})
    assert not worker_gone({"buildq.worker": f"elsewhere:{proc.pid}"})  # not ours to judge
    assert not worker_gone({})
