"""The Python buildctl stand-in's simulated daemons, cache export failure and remote contexts."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.standin import FIXTURES, write_standin_executable
from tests.standin import standin_replay as R
from tests.standin.scenarios import (
    cache_export_failed,
    daemon_dir,
    daemon_down,
    daemon_invocations,
    daemon_up,
    daemons_env,
    hang,
    scenario_env,
    succeed,
)

A = "tcp://127.0.0.1:1234"
B = "tcp://127.0.0.1:1236"
CACHE = "127.0.0.1:5000/demo/app:buildcache"
REFUSED = (
    "error: listing workers for Build: failed to list workers: Unavailable: connection error: desc = "
    '"transport: Error while dialing: dial tcp 127.0.0.1:1234: connect: connection refused"'
)
GOAWAY = (FIXTURES / "errors" / "err_iii_sigterm_sigkill_plain.stderr").read_text().splitlines()[-1]
TIME_RE = re.compile(r'"(started|completed|timestamp)":"[^"]*"')
DOWNLOAD = "error: failed to solve: failed to read downloaded context: failed to load cache key: "


@pytest.fixture
def buildctl(tmp_path: Path) -> Path:
    return write_standin_executable(tmp_path / "bin")


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    path = tmp_path / "ctx"
    path.mkdir()
    (path / "Dockerfile").write_text("FROM scratch\n")
    return path


@pytest.fixture
def daemons(tmp_path: Path) -> Path:
    return tmp_path / "daemons"


def clean_env(env: dict[str, str] | None) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}, **(env or {})}


def run(exe: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(exe), *args], env=clean_env(env), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def build_argv(
    md: Path,
    *extra: str,
    addr: str = A,
    ctx: Path | None = None,
    progress: str = "rawjson",
    cache: str | None = CACHE,
) -> list[str]:
    argv = ["--addr", addr, "build", "--frontend", "dockerfile.v0"]
    if ctx is not None:
        argv += ["--local", f"context={ctx}", "--local", f"dockerfile={ctx}"]
    argv += ["--output", "type=image,name=127.0.0.1:5000/demo/app:1,push=true"]
    if cache:
        argv += ["--export-cache", f"type=registry,ref={cache},mode=max"]
        argv += ["--import-cache", f"type=registry,ref={cache}"]
    return [*argv, f"--progress={progress}", "--metadata-file", str(md), *extra]


def workers(exe: Path, env: dict[str, str], addr: str = A) -> subprocess.CompletedProcess[str]:
    return run(exe, ["--addr", addr, "debug", "workers"], env)


def vertexes(stderr: str) -> dict[str, dict[str, Any]]:
    """Vertexes of a rawjson stream merged by digest."""
    merged: dict[str, dict[str, Any]] = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            for vx in json.loads(line).get("vertexes", []):
                merged.setdefault(vx["digest"], {}).update(vx)
    return merged


def names(stderr: str) -> set[str]:
    return {vx["name"] for vx in vertexes(stderr).values()}


# ---- outages ------------------------------------------------------------------------------------


def test_restart_kills_the_running_build_refuses_new_ones_then_recovers(
    buildctl: Path, ctx: Path, daemons: Path, tmp_path: Path
) -> None:
    env = daemons_env(daemons)
    running = subprocess.Popen(
        [str(buildctl), *build_argv(tmp_path / "m0.json", ctx=ctx)],
        env=clean_env({**env, **scenario_env(hang(after_lines=2))}),
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert running.stderr is not None
    assert all(running.stderr.readline().startswith("{") for _ in range(2))  # it runs
    until = daemon_down(daemons, A, 1.5)
    assert running.wait(30) == 1
    assert running.stderr.read().splitlines() == [GOAWAY]

    refused = run(buildctl, build_argv(tmp_path / "m1.json", ctx=ctx), env)
    assert (refused.returncode, refused.stderr.splitlines()) == (1, [REFUSED])
    assert not (tmp_path / "m1.json").exists()
    listing = workers(buildctl, env)
    assert listing.returncode == 1
    assert listing.stderr == "error: " + REFUSED.split("listing workers for Build: ", 1)[1] + "\n"
    other = run(buildctl, build_argv(tmp_path / "m2.json", ctx=ctx, addr=B), env)
    assert other.returncode == 0  # another daemon is not affected

    time.sleep(max(0.0, until - time.time()) + 0.05)
    after = run(buildctl, build_argv(tmp_path / "m3.json", ctx=ctx), env)
    assert after.returncode == 0, after.stderr
    assert "containerimage.digest" in json.loads((tmp_path / "m3.json").read_text())
    assert workers(buildctl, env).returncode == 0

    log = daemon_invocations(daemons, A)
    assert [(e["cmd"], e["outcome"], e["rc"]) for e in log] == [
        ("build", "goaway", 1), ("build", "refused", 1), ("debug-workers", "refused", 1),
        ("build", "succeeded", 0), ("debug-workers", "succeeded", 0),
    ]  # fmt: skip
    assert sum(e["cmd"] == "build" and e["outcome"] == "refused" for e in log) == 1
    assert all(e["key"] == CACHE for e in log if e["cmd"] == "build")
    assert [e["outcome"] for e in daemon_invocations(daemons, B)] == ["succeeded"]


def test_graceful_stop_without_goaway_lets_the_running_build_finish(
    buildctl: Path, ctx: Path, daemons: Path, tmp_path: Path
) -> None:
    env = daemons_env(daemons)
    md = tmp_path / "m.json"
    running = subprocess.Popen(
        [str(buildctl), *build_argv(md, ctx=ctx)],
        env=clean_env({**env, **scenario_env(succeed(sleep_s=1))}),
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert running.stderr is not None
    assert running.stderr.readline().startswith("{")
    daemon_down(daemons, A, 30, goaway=False)
    assert run(buildctl, build_argv(tmp_path / "m1.json", ctx=ctx), env).returncode == 1
    assert running.wait(30) == 0
    assert not any(ln.startswith("error: ") for ln in running.stderr.read().splitlines()) and md.exists()
    daemon_up(daemons, A)
    assert run(buildctl, build_argv(tmp_path / "m2.json", ctx=ctx), env).returncode == 0
    assert [e["outcome"] for e in daemon_invocations(daemons, A)] == ["refused", "succeeded", "succeeded"]


def test_state_lives_in_a_folder_per_address(daemons: Path) -> None:
    assert daemon_dir(daemons, A) == daemons / "tcp___127.0.0.1_1234"
    until = daemon_down(daemons, A, 60)
    state = json.loads((daemon_dir(daemons, A) / "state.json").read_text())
    assert state["down_until"] == until and state["goaway"] is True
    daemon_up(daemons, A)
    assert json.loads((daemon_dir(daemons, A) / "state.json").read_text())["down_until"] is None
    assert not list(daemon_dir(daemons, A).glob("*.tmp"))


# ---- local cache per daemon ---------------------------------------------------------------------


def test_cold_warm_and_regwarm_follow_each_daemons_cache(
    buildctl: Path, ctx: Path, daemons: Path, tmp_path: Path
) -> None:
    env = daemons_env(daemons)

    def build(addr: str, **kw: Any) -> str:
        proc = run(buildctl, build_argv(tmp_path / "m.json", ctx=ctx, addr=addr, progress="plain", **kw), env)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    def plain(phase: str) -> str:
        return (FIXTURES / "builds" / f"ctx_oci_plain_{phase}.stderr").read_text()

    assert build(A) == plain("cold")
    assert build(A) == plain("warm")
    assert build(B) == plain("regwarm")  # A exported the cache B imports
    assert build(B) == plain("warm")
    assert build(B, cache="127.0.0.1:5000/demo/other:buildcache") == plain("cold")
    variants = [e["variant"] for e in daemon_invocations(daemons, A) + daemon_invocations(daemons, B)]
    assert variants == ["cold", "warm", "regwarm", "warm", "cold"]


def test_no_registry_cache_without_export_or_import(
    buildctl: Path, ctx: Path, daemons: Path, tmp_path: Path
) -> None:
    env = daemons_env(daemons)
    md = tmp_path / "m.json"
    no_cache = run(buildctl, build_argv(md, ctx=ctx, cache=None), env)
    assert no_cache.returncode == 0 and "cache.manifest" not in json.loads(md.read_text())
    assert run(buildctl, build_argv(md, ctx=ctx, cache=None), env).returncode == 0
    assert run(buildctl, build_argv(md, ctx=ctx, cache=None, addr=B), env).returncode == 0
    variants = [e["variant"] for e in daemon_invocations(daemons, A) + daemon_invocations(daemons, B)]
    assert variants == ["cold", "warm", "cold"]  # keyed by the image name; nothing in the registry


def test_rawjson_variants_replay_their_captures(
    buildctl: Path, ctx: Path, daemons: Path, tmp_path: Path
) -> None:
    env = daemons_env(daemons)
    streams = [run(buildctl, build_argv(tmp_path / "m.json", ctx=ctx, addr=a), env).stderr for a in (A, A, B)]
    for stream, phase in zip(streams, ["cold", "warm", "regwarm"], strict=True):
        genuine = (FIXTURES / "builds" / f"ctx_oci_rawjson_{phase}.stderr").read_text()
        assert [TIME_RE.sub("T", ln) for ln in stream.splitlines()] == [
            TIME_RE.sub("T", ln) for ln in genuine.splitlines()
        ]
    steps = [{vx["name"]: vx.get("cached", False) for vx in vertexes(s).values() if "COPY" in vx["name"]}
             for s in streams]  # fmt: skip
    assert not any(steps[0].values()) and all(steps[1].values()) and all(steps[2].values())
    imports = [[vx.get("error") for vx in vertexes(s).values() if vx["name"].startswith("importing cache")]
               for s in streams]  # fmt: skip
    assert imports[0][0].endswith(": not found") and imports[1:] == [[None], [None]]


# ---- cache export failure -----------------------------------------------------------------------


def test_failed_cache_export_exits_0_with_a_vertex_error_and_no_cache_manifest(
    buildctl: Path, ctx: Path, tmp_path: Path
) -> None:
    md = tmp_path / "m.json"
    proc = run(buildctl, build_argv(md, ctx=ctx), scenario_env(cache_export_failed()))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith("{") for line in lines)
    export = [vx for vx in vertexes(proc.stderr).values() if vx["name"] == R.CACHE_EXPORT_NAME]
    assert len(export) == 1 and export[0]["completed"]
    assert export[0]["error"].startswith("error writing layer blob: failed to do request: Head ")
    assert export[0]["error"].endswith("dial tcp 127.0.0.1:5000: connect: connection refused")
    assert "https://127.0.0.1:5000/v2/demo/app/blobs/sha256:" in export[0]["error"]
    assert "error" in json.loads(lines[-1])["vertexes"][0]  # the last line reports it
    meta = json.loads(md.read_text())
    assert meta["containerimage.digest"] and "cache.manifest" not in meta

    normal = run(buildctl, build_argv(md, ctx=ctx))
    assert normal.returncode == 0 and "cache.manifest" in json.loads(md.read_text())


def test_failed_cache_export_plain_and_strict(buildctl: Path, ctx: Path, tmp_path: Path) -> None:
    md = tmp_path / "m.json"
    plain = run(buildctl, build_argv(md, ctx=ctx, progress="plain"), scenario_env(cache_export_failed()))
    assert plain.returncode == 0
    assert plain.stderr.splitlines()[-3:] == ["------", " > exporting cache to registry:", "------"]
    assert any(ln.startswith("#8 ERROR: error writing layer blob: ") for ln in plain.stderr.splitlines())
    md.unlink()
    strict = run(buildctl, build_argv(md, ctx=ctx), scenario_env(cache_export_failed(strict=True)))
    assert strict.returncode == 1 and not md.exists()
    error = [vx["error"] for vx in vertexes(strict.stderr).values() if vx["name"] == R.CACHE_EXPORT_NAME]
    assert strict.stderr.splitlines()[-1] == f"error: failed to solve: {error[0]}"


def test_failed_cache_export_leaves_no_registry_cache(
    buildctl: Path, ctx: Path, daemons: Path, tmp_path: Path
) -> None:
    env = daemons_env(daemons)
    md = tmp_path / "m.json"
    failed = run(buildctl, build_argv(md, ctx=ctx), {**env, **scenario_env(cache_export_failed())})
    assert failed.returncode == 0
    assert run(buildctl, build_argv(md, ctx=ctx, addr=B), env).returncode == 0
    assert [e["variant"] for e in daemon_invocations(daemons, B)] == ["cold"]


@pytest.mark.parametrize("phase", ["cold", "warm", "regwarm"])
@pytest.mark.parametrize("rawjson", [True, False])
def test_cache_export_edit_keeps_genuine_lines(phase: str, rawjson: bool) -> None:
    lines = R.read_lines(R.capture_path(f"ctx_oci_rawjson_{phase}", rawjson))
    edited = R.cache_export_failed_lines(lines, rawjson, None, CACHE)
    cut = len(edited) - (1 if rawjson else 0)
    if rawjson:
        assert edited[:cut] == lines[:cut] and all(R.dumps(R.loads(ln)) == ln for ln in lines)
        assert max(R.line_times(edited[-1])) <= max(R.line_times(lines[cut]))
    else:
        err = next(i for i, ln in enumerate(edited) if ln.startswith("#8 ERROR: "))
        assert edited[err].startswith("#8 ERROR: error writing layer blob: ")
        layer = next(i for i, ln in enumerate(lines) if ln.startswith("#8 writing layer "))
        assert edited[: layer + 1] == lines[: layer + 1]
        assert all(ln in lines for ln in edited[layer + 1 : err])  # the genuine "preparing … done"
        summaries = lines[lines.index("#8 DONE 0.0s") + 1 :]
        assert edited[err + 1 :] == [*summaries, "------", " > exporting cache to registry:", "------"]


# ---- remote contexts ----------------------------------------------------------------------------


def make_tar(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_base(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "ctx.tar.gz").write_bytes(make_tar({"./Dockerfile": b"FROM scratch\n", "./app/a.txt": b"a\n"}))
    (root / "nodf.tar.gz").write_bytes(make_tar({"app/a.txt": b"a\n"}))
    (root / "ctx.tar").write_bytes(make_tar({"sub/Alt.Dockerfile": b"FROM scratch\n"}, mode="w"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_tar_context_builds_with_the_remote_context_vertex(
    buildctl: Path, http_base: str, tmp_path: Path
) -> None:
    md = tmp_path / "m.json"
    proc = run(buildctl, build_argv(md, "--opt", f"context={http_base}/ctx.tar.gz"))
    assert proc.returncode == 0, proc.stderr
    assert "[internal] load remote build context" in names(proc.stderr)
    assert "[internal] load build context" not in names(proc.stderr)
    assert md.exists()
    plain = run(buildctl, build_argv(md, "--opt", f"context={http_base}/ctx.tar.gz", progress="plain"))
    assert "#4 [internal] load remote build context" in plain.stderr.splitlines()
    alt = ["--opt", f"context={http_base}/ctx.tar", "--opt", "filename=sub/Alt.Dockerfile"]
    assert run(buildctl, build_argv(md, *alt)).returncode == 0


def test_remote_context_failures(buildctl: Path, http_base: str, tmp_path: Path) -> None:
    md = tmp_path / "m.json"
    missing = run(buildctl, build_argv(md, "--opt", f"context={http_base}/nope.tar.gz"))
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [DOWNLOAD + "invalid response status 404"]
    nodf = run(buildctl, build_argv(md, "--opt", f"context={http_base}/nodf.tar.gz"))
    assert nodf.returncode == 1
    assert nodf.stderr.splitlines() == [
        "error: failed to solve: failed to read dockerfile: open Dockerfile: no such file or directory"
    ]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ctx.tar.gz"
    down = run(buildctl, build_argv(md, "--opt", f"context={url}"))
    assert down.stderr.splitlines() == [
        f'{DOWNLOAD}Get "{url}": dial tcp 127.0.0.1:{port}: connect: connection refused'
    ]
    assert not md.exists()


def test_git_context_is_not_downloaded(buildctl: Path, tmp_path: Path) -> None:
    proc = run(
        buildctl, build_argv(tmp_path / "m.json", "--opt", "context=https://example.invalid/r.git#main")
    )
    assert proc.returncode == 0
    assert "[internal] load build context" in names(proc.stderr)
