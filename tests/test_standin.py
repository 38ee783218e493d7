"""The buildctl stand-ins imitate buildctl v0.21.0's command line, checks, output and failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit.progress import parse_line
from tests.standin import FIXTURES, SH_STANDIN, flat_captures, write_standin_executable
from tests.standin import standin_checks as C
from tests.standin import standin_replay as R
from tests.standin.scenarios import (
    TRANSIENT_RE,
    fail,
    flaky,
    genuine_argv,
    hang,
    scenario_env,
    scenario_opt,
    succeed,
)

CAPTURE = FIXTURES / "builds" / "ctx_oci_rawjson_cold"
ENOENT = "no such file or directory"
TIMESTAMP_RE = re.compile(r'"(started|completed|timestamp)":"[^"]*"')


@pytest.fixture
def buildctl(tmp_path: Path) -> Path:
    return write_standin_executable(tmp_path / "bin")


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    path = tmp_path / "ctx"
    path.mkdir()
    (path / "Dockerfile").write_text("FROM scratch\n")
    return path


def run(exe: Path | list[str], args: list[str], env: dict[str, str] | None = None, **kw: Any):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    cmd = [str(exe)] if isinstance(exe, Path) else exe
    return subprocess.run(
        cmd + args, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, **kw,
    )  # fmt: skip


def short_argv(ctx: Path, md: Path, *extra: str, name: str = "reg.example/app:1") -> list[str]:
    return [
        "--addr", "tcp://127.0.0.1:1234", "build", "--frontend", "dockerfile.v0",
        "--local", f"context={ctx}", "--output", f"type=image,name={name},push=true",
        "--progress=rawjson", "--metadata-file", str(md), *extra,
    ]  # fmt: skip


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- success ------------------------------------------------------------------------------


def test_genuine_command_line_succeeds_like_the_capture(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    md = tmp_path / "out" / "meta.json"
    md.parent.mkdir()
    proc = run(buildctl, genuine_argv(context_dir=str(ctx), metadata_file=str(md)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(CAPTURE.with_suffix(".stderr").read_text().splitlines())
    assert all(parse_line(line) is not None for line in lines)
    genuine = json.loads(CAPTURE.with_suffix(".meta.json").read_text())
    meta = json.loads(md.read_text())
    assert list(meta) == list(genuine)  # same keys, same (sorted) order
    assert meta["image.name"] == genuine["image.name"]
    assert meta["containerimage.digest"] == meta["containerimage.descriptor"]["digest"]
    assert meta["containerimage.descriptor"].keys() == genuine["containerimage.descriptor"].keys()
    cache = json.loads(meta["cache.manifest"])
    assert cache.keys() == json.loads(genuine["cache.manifest"]).keys()


def test_digest_follows_argv(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    digests = []
    for name in ("r/a:1", "r/b:1", "r/a:1"):
        md = tmp_path / "m.json"
        assert run(buildctl, short_argv(ctx, md, name=name)).returncode == 0
        digests.append(json.loads(md.read_text())["containerimage.digest"])
    assert digests[0] != digests[1] and digests[0] == digests[2]


def test_quoted_csv_names_and_no_cache_manifest_without_export(
    buildctl: Path, ctx: Path, tmp_path: Path
) -> None:
    md = tmp_path / "m.json"
    argv = short_argv(ctx, md) + ["--output", 'type=image,"name=a/b:1,a/b:2",push=true']
    assert run(buildctl, argv).returncode == 0
    meta = json.loads(md.read_text())
    assert meta["image.name"] == "reg.example/app:1,a/b:1,a/b:2"
    assert "cache.manifest" not in meta


def test_plain_progress_replays_the_plain_capture(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    argv = [a if a != "--progress=rawjson" else "--progress=plain" for a in short_argv(ctx, tmp_path / "m")]
    proc = run(buildctl, argv)
    plain = (FIXTURES / "builds" / "ctx_oci_plain_cold.stderr").read_text()
    assert proc.returncode == 0 and proc.stderr == plain


def test_version_and_debug_workers_print_the_captured_text(buildctl: Path) -> None:
    assert run(buildctl, ["--version"]).stdout == (FIXTURES / "version" / "buildctl_version.txt").read_text()
    workers = run(buildctl, ["--addr", "tcp://127.0.0.1:1234", "debug", "workers", "-v"])
    assert workers.stdout == (FIXTURES / "version" / "buildctl_debug_workers.txt").read_text()
    refused = run(
        buildctl, ["--addr", "tcp://127.0.0.1:1235", "debug", "workers"], scenario_env({"kind": "refused"})
    )
    assert refused.returncode == 1
    assert refused.stderr == (
        "error: failed to list workers: Unavailable: connection error: desc = "
        '"transport: Error while dialing: dial tcp 127.0.0.1:1235: connect: connection refused"\n'
    )


# ---- command-line checks ------------------------------------------------------------------


def test_unknown_build_flag_fails_like_urfave_cli(buildctl: Path) -> None:
    proc = run(buildctl, ["build", "--frontend", "dockerfile.v0", "--bogus", "x"])
    assert proc.returncode == 1
    assert proc.stderr == "error: flag provided but not defined: -bogus\n"
    assert proc.stdout.startswith("Incorrect Usage: flag provided but not defined: -bogus\n\nNAME:\n")


def test_unknown_global_flag_and_unknown_command(buildctl: Path) -> None:
    proc = run(buildctl, ["--bogus", "build"])
    assert (proc.returncode, proc.stderr) == (1, "error: flag provided but not defined: -bogus\n")
    assert proc.stdout.startswith(
        "Incorrect Usage. flag provided but not defined: -bogus\n\nNAME:\n   buildctl"
    )
    nope = run(buildctl, ["nope"])
    assert (nope.returncode, nope.stderr) == (3, "No help topic for 'nope'\n")


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--frontend"], "flag needs an argument: -frontend"),
        (["--no-cache=maybe"], 'invalid boolean value "maybe" for -no-cache: parse error'),
        (["--opt", "foo"], "invalid opt: invalid value foo"),
        (["--local", "context"], "invalid local: invalid value context"),
        (["--local", "context=/nonexistent/x"], f"invalid local: resolve : lstat /nonexistent: {ENOENT}"),
        (["--output", 'type=image,name=a"b'], 'parse error on line 1, column 18: bare " in non-quoted-field'),
        (["--output", "name=a"], "--output requires type=<type>"),
        (["--output", "type=image,push"], "invalid value push"),
        (["--export-cache", 'type=registry,"ref=a'], f"parse error on line 1, column 16: {C.QUOTE_ERR}"),
        (["--import-cache", "type=,ref=a"], "--import-cache requires type=<type>"),
        (["--secret", "id=x,src=/no/s"], f"failed to stat /no/s: stat /no/s: {ENOENT}"),
        (["--secret", "id=x,bogus=1"], "unexpected key 'bogus' in 'bogus=1'"),
        (["--secret", "src=/etc/hostname"], "secret missing ID"),
        (["--allow", "network.none"], "unknown entitlement network.none"),
        (["--progress", "fancy"], "invalid progress mode fancy"),
    ],
)  # fmt: skip
def test_invalid_values_fail_with_buildctl_texts(
    buildctl: Path, ctx: Path, tmp_path: Path, extra, error
) -> None:
    md = tmp_path / "m.json"
    proc = run(buildctl, short_argv(ctx, md, *extra))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == f"error: {error}"
    assert not md.exists()


def test_secret_from_unset_env_is_accepted_and_values_never_echoed(buildctl: Path, ctx: Path, tmp_path: Path):
    log = tmp_path / "log.jsonl"
    argv = short_argv(
        ctx, tmp_path / "m", "--secret", "id=a,env=BUILDQ_TEST_UNSET", "--secret", "id=tok,env=TOK"
    )
    proc = run(buildctl, argv, {"TOK": "s3cr3t-value", "STANDIN_LOG": str(log)})
    assert proc.returncode == 0  # buildctl v0.21.0 sends an empty secret for an unset env=VAR
    assert "s3cr3t-value" not in proc.stdout + proc.stderr + log.read_text()


def test_csv_fields_follow_go_csvvalue() -> None:
    assert C.csv_fields('type=image,"name=a,b",push=true') == ["type=image", "name=a,b", "push=true"]
    assert C.csv_fields('"a""b",c') == ['a"b', "c"]
    assert C.csv_fields("a,,b") == ["a", "", "b"]
    with pytest.raises(C.BuildctlError, match="^EOF$"):
        C.csv_fields("")


# ---- timestamps and pacing ----------------------------------------------------------------


def test_every_capture_timestamp_round_trips() -> None:
    text = CAPTURE.with_suffix(".stderr").read_text()
    for line in text.splitlines():
        for a, b in R._time_spans(line):
            assert R.format_rfc3339_ns(R.parse_rfc3339_ns(line[a:b])) == line[a:b]
    assert R.parse_rfc3339_ns("1970-01-01T00:00:01.5Z") == 1_500_000_000


def test_replay_moves_first_timestamp_to_now_and_keeps_offsets(capfd: pytest.CaptureFixture[str]) -> None:
    lines = R.read_lines(str(CAPTURE.with_suffix(".stderr")))
    now = 1_900_000_000_123_456_789
    R.Replayer(lines, clock=lambda: now).emit()
    out = capfd.readouterr().err.splitlines()
    orig = [t for ln in lines for t in R.line_times(ln)]
    shifted = [t for ln in out for t in R.line_times(ln)]
    assert min(shifted) == now
    assert [t - min(shifted) for t in shifted] == [t - min(orig) for t in orig]
    assert [R.shift_line(ln, 0) for ln in out] == out and len(out) == len(lines)


def test_pace_spreads_lines_over_f_times_the_capture(monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    clock = [10**18]
    monkeypatch.setattr(R.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + int(s * 1e9)))
    lines = R.read_lines(str(CAPTURE.with_suffix(".stderr")))
    times = [t for ln in lines for t in R.line_times(ln)]
    rep = R.Replayer(lines, pace=2.0, clock=lambda: clock[0])
    rep.emit()
    last_line_max = max(R.line_times(lines[-1]))
    assert clock[0] - 10**18 == pytest.approx(2 * (last_line_max - min(times)), abs=1000)
    capfd.readouterr()


# ---- scenarios ----------------------------------------------------------------------------


def test_fail_prints_some_lines_then_the_error_last(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    md = tmp_path / "m.json"
    proc = run(
        buildctl, short_argv(ctx, md, *scenario_opt(fail("failed to solve: boom", after_lines=3, rc=7)))
    )
    assert proc.returncode == 7
    lines = proc.stderr.splitlines()
    assert len(lines) == 4 and lines[-1] == "error: failed to solve: boom"
    assert not md.exists()


def test_fail_with_error_capture_and_buildarg_beats_env(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    sc = fail(error_capture="err_iii_sigterm_sigkill_plain", after_lines=0)
    proc = run(buildctl, short_argv(ctx, tmp_path / "m", *scenario_opt(sc)), scenario_env(succeed()))
    genuine = (FIXTURES / "errors" / "err_iii_sigterm_sigkill_plain.stderr").read_text().splitlines()[-1]
    assert proc.returncode == 1 and proc.stderr.splitlines() == [genuine]


def _start(buildctl: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    return subprocess.Popen([str(buildctl), *argv], env={**clean, **env}, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("sig", "rc", "ended"), [(signal.SIGTERM, 1, True), (signal.SIGKILL, -9, False)])
def test_hang_waits_until_killed_and_log_shows_it(buildctl: Path, ctx: Path, tmp_path: Path, sig, rc, ended):
    log = tmp_path / "log.jsonl"
    proc = _start(
        buildctl,
        short_argv(ctx, tmp_path / "m", *scenario_opt(hang(after_lines=2))),
        {"STANDIN_LOG": str(log)},
    )
    assert proc.stderr is not None
    first = [proc.stderr.readline(), proc.stderr.readline()]
    assert all(parse_line(line) for line in first)
    proc.send_signal(sig)
    assert proc.wait(30) == rc
    rest = proc.stderr.read()
    events = read_log(log)
    assert [e["event"] for e in events] == (["start", "end"] if ended else ["start"])
    if ended:
        assert rest == "error: failed to solve: Canceled: context canceled\n"
        assert events[1]["outcome"] == "killed" and events[1]["rc"] == 1


def test_flaky_fail_first_counts_invocations_per_key(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    env = {"STANDIN_LOG": str(log), **scenario_env(flaky(tmp_path / "state", fail_first=2))}
    results = [run(buildctl, short_argv(ctx, tmp_path / "m", name="r/a:1"), env) for _ in range(3)]
    other = run(buildctl, short_argv(ctx, tmp_path / "m2", name="r/b:1"), env)
    assert [r.returncode for r in results] == [1, 1, 0] and other.returncode == 1
    for r in results[:2]:
        assert TRANSIENT_RE.search(r.stderr.splitlines()[-1])
    ends = [e for e in read_log(log) if e["event"] == "end"]
    assert [(e["key"], e["attempt"], e["outcome"]) for e in ends] == [
        ("r/a:1", 1, "failed"), ("r/a:1", 2, "failed"), ("r/a:1", 3, "succeeded"), ("r/b:1", 1, "failed"),
    ]  # fmt: skip
    assert all(e["error"] is None or TRANSIENT_RE.search(e["error"]) for e in ends)


def test_flaky_probability_is_deterministic_and_varied() -> None:
    sc = {"kind": "flaky", "p": 0.3, "seed": 7}
    outcomes = [R.flaky_outcome(sc, f"k{i % 20}", i // 20 + 1, "tcp://127.0.0.1:1234") for i in range(400)]
    again = [R.flaky_outcome(sc, f"k{i % 20}", i // 20 + 1, "tcp://127.0.0.1:1234") for i in range(400)]
    assert outcomes == again
    failures = [o for o in outcomes if o is not None]
    assert 0.2 < len(failures) / len(outcomes) < 0.4
    assert len(set(failures)) >= 5 and all(TRANSIENT_RE.search(f) for f in failures)


def test_claim_attempt_numbers_are_unique_under_concurrency(tmp_path: Path) -> None:
    got: list[int] = []
    threads = [
        threading.Thread(target=lambda: got.append(R.claim_attempt(str(tmp_path), "a/b:1")))
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 17))


def test_log_records_start_and_end(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    argv = short_argv(ctx, tmp_path / "m", *scenario_opt(fail("failed to solve: x")))
    proc = run(buildctl, argv, {"STANDIN_LOG": str(log)})
    start, end = read_log(log)
    assert start == {"event": "start", "pid": start["pid"], "argv": ["buildctl", *argv],
                     "started": start["started"], "key": "reg.example/app:1"}  # fmt: skip
    assert end["pid"] == start["pid"] and end["ended"] >= end["started"] == start["started"]
    assert (end["outcome"], end["rc"], end["error"], proc.returncode) == (
        "failed",
        1,
        "failed to solve: x",
        1,
    )


# ---- the busybox-sh stand-in behaves the same on the common path --------------------------


@pytest.fixture
def sh_buildctl(docker_url: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The sh stand-in run by busybox (installed by .ci/dockerd.sh), its captures in a temp folder."""
    busybox = shutil.which("busybox")
    assert busybox, ".ci/dockerd.sh should have installed busybox-static"
    env = {"STANDIN_CAPTURES": str(flat_captures(tmp_path / "captures"))}
    return [busybox, "sh", str(SH_STANDIN)], env


@pytest.mark.docker
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--bogus"],
        ["--opt", "foo"],
        ["--local", "context=/nonexistent/x"],
        [
            "--output",
            'type=image,"name=a/b:1,a/b:2",push=true',
            "--export-cache",
            "type=registry,ref=r/c:cache",
        ],
        ["--output", 'type=image,"name=a'],
        scenario_opt(fail("failed to solve: x", after_lines=2, rc=3)),
        scenario_opt(fail(error_capture="err_iv_syntax_plain")),
    ],
)
def test_sh_standin_matches_python_standin(
    sh_buildctl, buildctl: Path, ctx: Path, tmp_path: Path, extra
) -> None:
    sh_cmd, sh_env = sh_buildctl
    results = []
    for exe, md in ((buildctl, tmp_path / "py.json"), (sh_cmd, tmp_path / "sh.json")):
        proc = run(exe, short_argv(ctx, md, *extra), sh_env)
        meta = json.loads(md.read_text()) if md.exists() else {}
        lines = proc.stderr.splitlines()
        last = TIMESTAMP_RE.sub("T", lines[-1]) if lines else None  # the sh stand-in does not shift
        results.append((proc.returncode, len(lines), last, proc.stdout, list(meta), meta.get("image.name")))
    assert results[0] == results[1]
