"""Issue 26, in-process: masking on whole values before any cut (a secret across the 16 KiB cut of a
long output line, stored through the real log stream), escaped forms, URL userinfo, the
case-insensitive ``BUILDQ_`` check, and pid files that never follow a planted symlink."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from buildq.buildkit.progress import MAX_PARTIAL_BYTES
from buildq.contract.grants import check_secrets, secret_granted
from buildq.contract.job import context_secrets, parse_job
from buildq.engine.attemptlog import AttemptLog
from buildq.engine.lifecycle import WorkerChecks
from buildq.engine.redact import Redactor
from buildq.errors import InvalidJobError, SettingsError
from buildq.launchers.local import LocalLauncher, private_folder
from buildq.store.logs import LogStore
from tests.harness import settings_from
from tests.test_logs import JOB, plain_texts, r, store  # noqa: F401 - fixtures

SECRET = "gr4nted-Npm-T0ken-3c9e5b"
VERTEX = "sha256:" + "ab" * 32


def output_line(data: bytes, second: int) -> str:
    """One rawjson line carrying step output (the shape BuildKit v0.21.0 prints)."""
    entry = {"vertex": VERTEX, "stream": 1, "data": base64.b64encode(data).decode(),
             "timestamp": f"2026-12-07T06:00:{second:02d}.000000000Z"}  # fmt: skip
    return json.dumps({"logs": [entry]}, separators=(",", ":"))


CHUNK = 4096  # the output arrives in pieces of this size; held output is released at a piece's end
RELEASED_AT = (MAX_PARTIAL_BYTES // CHUNK + 1) * CHUNK  # where the first release of held output cuts


@pytest.mark.parametrize(
    "start",
    [MAX_PARTIAL_BYTES - 5, RELEASED_AT - 1, RELEASED_AT - 5, RELEASED_AT - len(SECRET) + 1],
    ids=["plain-cut", "release-1", "release-5", "release-last"],
)
def test_a_secret_across_the_16k_cut_of_a_long_line_is_masked_whole(store: LogStore, start: int) -> None:  # noqa: F811
    """A RUN step prints one line longer than 16 KiB, a granted secret across where the plain
    renderer cuts it (the record's tail) or where the stored output is released, in pieces."""
    line = b"x" * start + SECRET.encode() + b" and more\n"
    log = AttemptLog(store, JOB, 1, redactor=Redactor([SECRET]))
    step = {"digest": VERTEX, "name": "[2/2] RUN ./print-long-line", "started": "2026-12-07T06:00:00.0Z"}
    log.feed(json.dumps({"vertexes": [step]}))
    for index, at in enumerate(range(0, len(line), CHUNK)):
        log.feed(output_line(line[at : at + CHUNK], index))
    pending, tail = log.ending("failed")
    assert tail and tail[-1].endswith("*** and more")  # the record's tail: the renderer's cut
    store.append(JOB, pending)
    raw = [e.line for e in store.read(JOB)]
    data = b"".join(
        base64.b64decode(item["data"])
        for text in raw
        if text.startswith("{")
        for item in json.loads(text).get("logs", [])
    )
    shown = "\n".join(plain_texts(store.read(JOB)))
    assert SECRET not in data.decode() and SECRET not in shown and SECRET not in "".join(tail)
    assert data.count(b"***") == 1 and data.endswith(b"*** and more\n")


def test_quoted_forms_of_a_value_are_masked() -> None:
    """Go's %q (an error text quoting a URL), JSON with Go's HTML escapes, Python's repr."""
    value = 'sig"a\\b<c>&d\n\x7f\v'
    masked = Redactor([value])
    go_q = 'a\\"sig\\"a\\\\b<c>&d\\n\\x7f\\v\\"'
    assert masked(f"parse {go_q}: bad") == 'parse a\\"***\\": bad'
    assert masked(json.dumps({"v": value})) == '{"v": "***"}'
    go_json = json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    assert masked(go_json) == '"***"'
    assert masked(repr(value)) == "'***'"


def test_url_userinfo_and_query_values_are_what_a_context_hides() -> None:
    assert context_secrets("https://ci:tok-3n-xyz@git.example/a/b.git#main") == [
        "ci:tok-3n-xyz",
        "tok-3n-xyz",
    ]
    assert context_secrets("https://s3.example/ctx.tgz?X-Amz-Signature=abcd1234") == ["abcd1234"]
    assert context_secrets("/srv/app") == []


def test_buildq_variables_are_never_granted_in_any_case() -> None:
    for name in ("BUILDQ_BROKER_URL", "buildq_sentinel_password", "Buildq_Redis"):
        assert not secret_granted(name, ["*"])
        job = parse_job({"context": "/srv/x", "tags": ["reg/app:1"], "secrets": [{"id": "x", "env": name}]})
        with pytest.raises(InvalidJobError, match="never granted") as refused:
            check_secrets(job, ["*"])
        assert refused.value.field == "secrets[0].env"
    assert secret_granted("NPM_TOKEN", ["*"])


def test_a_pid_file_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    private_folder(folder, "BUILDQ_LOCAL_STATE_DIR")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    launcher = LocalLauncher("/bin/true", state_dir=str(folder))
    (folder / f"job-1.{os.getpid()}.pid").symlink_to(victim)
    written = launcher._write_pidfile("job-1", os.getpid())
    assert victim.read_text() == "keep me"
    assert written is not None and not written.is_symlink()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert json.loads(written.read_text())["job_id"] == "job-1"


def test_a_state_folder_must_be_the_workers_own(tmp_path: Path) -> None:
    made = tmp_path / "made"
    private_folder(made, "BUILDQ_LOCAL_STATE_DIR")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(SettingsError, match="writable by others"):
        private_folder(shared, "BUILDQ_LOCAL_STATE_DIR")
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(SettingsError, match="owned by uid 65534"):
        private_folder(other, "BUILDQ_LOCAL_STATE_DIR")


def worker_checks(tmp_path: Path, **settings: str) -> WorkerChecks:
    env = {"BUILDQ_BROKER_URL": "redis://127.0.0.1:1/0", **settings}
    return WorkerChecks(settings_from(env), {"WORKER_TOKEN": "x"})


def refused(check: WorkerChecks, **job: object) -> tuple[str, str] | None:
    """(field, message) the worker's checks refuse ``job`` with; None when accepted."""
    try:
        check(parse_job({"tags": ["reg/app:1"], **job}))
    except InvalidJobError as exc:
        return exc.field, exc.message
    return None


def refused_field(check: WorkerChecks, **job: object) -> str | None:
    answer = refused(check, **job)
    return answer[0] if answer else None


def test_the_worker_checks_refuse_pseudo_filesystems_with_no_roots(tmp_path: Path, context_dir: Path) -> None:
    check = worker_checks(tmp_path)
    (tmp_path / "self").symlink_to("/proc/self")
    (context_dir / "Dockerfile").unlink()
    (context_dir / "Dockerfile").symlink_to("/proc/self/environ")
    for job, field in (
        ({"context": "/proc/self", "dockerfile": "environ"}, "context"),
        ({"context": "/", "dockerfile": "proc/self/environ"}, "context"),
        ({"context": str(tmp_path / "self"), "dockerfile": "environ"}, "context"),
        ({"context": str(context_dir)}, "dockerfile"),
    ):
        answer = refused(check, **job)
        assert answer is not None and answer[0] == field, (job, answer)
        assert "pseudo-filesystem" in answer[1], answer


def test_ssh_git_contexts_only_when_granted(tmp_path: Path) -> None:
    ssh = "ssh://git@git.example/team/app.git"
    assert refused_field(worker_checks(tmp_path), context=ssh) == "context"
    assert refused_field(worker_checks(tmp_path), context="https://git.example/team/app.git") is None
    assert refused_field(worker_checks(tmp_path, BUILDQ_GIT_TRANSPORTS="https,ssh"), context=ssh) is None


def test_a_tag_with_a_non_ascii_letter_is_refused_naming_it() -> None:
    for tag in ("reg/app:v\u00e9", "reg/app:\u0661\u0662", "reg/app:\uff41"):
        with pytest.raises(InvalidJobError) as refused:
            parse_job({"context": "/srv/x", "tags": ["reg/app:1", tag]})
        assert refused.value.field == "tags" and "tags[1]" in refused.value.message
