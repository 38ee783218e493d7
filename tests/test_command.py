"""The buildctl argv matches buildctl v0.21.0's flags and the genuine captured command lines."""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from buildq.buildkit.command import build_argv, csv_attrs
from buildq.contract.job import BuildJob, parse_job
from buildq.engine.runner import RunSpec, Watch, build_request, run_build
from buildq.engine.scheduler import Scheduler
from buildq.launchers.base import BuildPaths, Launcher, LaunchSpec, RunningBuild

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
PATHS = BuildPaths(context_dir="/build/ctx", dockerfile_dir="/build/ctx", metadata_file="/out/m.json")


def argv_of(job: BuildJob, paths: BuildPaths, **options: Any) -> list[str]:
    """The argv the worker runs for ``job``: job -> plain build request -> buildctl flags."""
    return build_argv(build_request(job, paths), **options)


class _Exited(RunningBuild):
    def lines(self) -> Iterator[str]:
        return iter(())

    def wait(self, timeout: float | None = None) -> int:
        return 1

    def kill(self) -> None:
        pass

    def read_metadata(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


class _Capturing(Launcher):
    """A launcher that keeps the LaunchSpec it is given (buildctl "exits 1" at once)."""

    def __init__(self, secret_files: bool = False) -> None:
        self.secret_files, self.specs = secret_files, []

    def prepare(
        self, job_id: str, context_dir: str | None, dockerfile_dir: str | None, secret_ids: Sequence[str] = ()
    ) -> BuildPaths:
        files = tuple((s, f"/run/b/{job_id}/secret-{i}") for i, s in enumerate(secret_ids))
        return BuildPaths(context_dir, dockerfile_dir, "/out/m.json", files if self.secret_files else ())

    def start(self, spec: LaunchSpec, paths: BuildPaths) -> RunningBuild:
        self.specs.append(spec)
        return _Exited()


def launched(job: BuildJob, environ: Mapping[str, str], *, secret_files: bool = False) -> LaunchSpec:
    """What the runner hands the launcher for ``job`` (with the worker's ``environ``)."""
    launcher, scheduler = _Capturing(secret_files), Scheduler()
    try:
        spec = RunSpec(number=1, daemon="tcp://bk:1234", launcher=launcher, scheduler=scheduler,
                       timeout_s=30, environ=environ)  # fmt: skip
        run_build(job, spec, Watch())
    finally:
        scheduler.stop()
    (only,) = launcher.specs
    return only


def flags(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def csv_fields(value: str) -> list[str]:
    return next(csv.reader(io.StringIO(value)))


def test_matches_the_genuine_capture_command() -> None:
    genuine = shlex.split((FIXTURES / "builds" / "ctx_oci_rawjson_cold.cmd").read_text())
    job = parse_job({"context": "/build/ctx", "tags": ["127.0.0.1:5000/demo/app:1"]})
    argv = argv_of(job, PATHS)
    # the genuine line has --addr (we pass BUILDKIT_HOST) and no filename/ignore-error
    assert genuine[3:6] == argv[0:3]
    assert flags(argv, "--local") == flags(genuine, "--local")
    assert flags(argv, "--output") == flags(genuine, "--output")
    assert flags(argv, "--import-cache") == flags(genuine, "--import-cache")
    assert flags(argv, "--export-cache") == [flags(genuine, "--export-cache")[0] + ",ignore-error=true"]
    assert "--progress=rawjson" in argv
    assert flags(argv, "--metadata-file") == ["/out/m.json"]
    assert flags(argv, "--opt") == ["filename=Dockerfile"]


def test_every_flag_is_a_buildctl_build_flag() -> None:
    help_text = (FIXTURES / "version" / "buildctl_build_help.txt").read_text()
    known = {w.rstrip(",") for w in help_text.split() if w.startswith("--")}
    job = parse_job(
        {
            "context": "/srv/ctx",
            "dockerfile": "docker/prod.Dockerfile",
            "target": "runtime",
            "build_args": {"VERSION": "1.2", "LIST": "a,b=c"},
            "platforms": ["linux/amd64", "linux/arm64/v8"],
            "tags": ["reg:5000/a/b:1", "reg:5000/a/b:latest"],
            "labels": {"org.opencontainers.image.source": "https://x"},
            "secrets": [{"id": "npm", "env": "NPM_TOKEN"}],
            "cache_mode": "min",
        }
    )
    argv = argv_of(job, PATHS)
    used = {a.split("=")[0] for a in argv if a.startswith("--")}
    assert used <= known
    opts = flags(argv, "--opt")
    assert "filename=prod.Dockerfile" in opts
    assert "target=runtime" in opts
    assert "build-arg:VERSION=1.2" in opts and "build-arg:LIST=a,b=c" in opts
    assert "platform=linux/amd64,linux/arm64/v8" in opts
    assert "label:org.opencontainers.image.source=https://x" in opts
    assert flags(argv, "--secret") == ["id=npm,env=NPM_TOKEN"]
    # two names in one CSV field, quoted so buildctl's CSV parser keeps them together
    out = flags(argv, "--output")[0]
    assert out == 'type=image,"name=reg:5000/a/b:1,reg:5000/a/b:latest",push=true'
    assert csv_fields(out) == ["type=image", "name=reg:5000/a/b:1,reg:5000/a/b:latest", "push=true"]
    export = csv_fields(flags(argv, "--export-cache")[0])
    assert export == [
        "type=registry",
        "ref=reg:5000/a/b:buildcache",
        "mode=min",
        "oci-mediatypes=true",
        "image-manifest=true",
        "ignore-error=true",
    ]


def test_insecure_registries_only_for_listed_hosts() -> None:
    job = parse_job({"context": "/srv/ctx", "tags": ["reg:5000/a:1"], "cache_ref": "other.io/a:cache"})
    argv = argv_of(job, PATHS, insecure_registries=["reg:5000"])
    assert csv_fields(flags(argv, "--output")[0])[-1] == "registry.insecure=true"
    assert "registry.insecure=true" not in flags(argv, "--export-cache")[0]
    assert not any("insecure=" in f and "registry.insecure" not in f for f in argv)
    job2 = parse_job({"context": "/srv/ctx", "tags": ["reg:5000/a:1"]})
    argv2 = argv_of(job2, PATHS, insecure_registries=["reg"])  # bare host matches any port
    assert csv_fields(flags(argv2, "--export-cache")[0])[-1] == "registry.insecure=true"
    assert csv_fields(flags(argv2, "--import-cache")[0])[-1] == "registry.insecure=true"


def test_no_push_exports_no_cache() -> None:
    job = parse_job({"context": "/srv/ctx", "tags": ["reg/a:1"], "push": False})
    argv = argv_of(job, PATHS)
    assert flags(argv, "--output") == ["type=image,name=reg/a:1,push=false"]
    assert flags(argv, "--export-cache") == []
    assert flags(argv, "--import-cache") == ["type=registry,ref=reg/a:buildcache"]


def test_git_context_uses_opt_context_not_local() -> None:
    job = parse_job({"context": "https://example.com/org/repo.git#main:sub", "tags": ["reg/a:1"]})
    argv = argv_of(job, BuildPaths(None, None, "/out/m.json"))
    assert flags(argv, "--local") == []
    assert "context=https://example.com/org/repo.git#main:sub" in flags(argv, "--opt")


def test_secret_values_never_in_argv() -> None:
    job = parse_job({"context": "/srv/ctx", "tags": ["reg/a:1"], "secrets": [{"id": "tok", "env": "TOK"}]})
    spec = launched(job, {"TOK": "s3cr3t-value", "OTHER": "not-given"})
    assert spec.env == {"BUILDKIT_HOST": "tcp://bk:1234", "TOK": "s3cr3t-value"} and dict(spec.secrets) == {}
    assert not any("s3cr3t" in a for a in spec.argv)
    assert not any("s3cr3t" in a for a in argv_of(job, PATHS))
    assert "s3cr3t" not in repr(spec)


def test_secret_files_when_the_launcher_asks_for_them() -> None:
    job = parse_job(
        {"context": "/srv/ctx", "tags": ["reg/a:1"],
         "secrets": [{"id": "tok", "env": "TOK"}, {"id": "npm", "env": "NPM"}]}
    )  # fmt: skip
    files = (("tok", "/run/b/j.1/secret-0"), ("npm", "/run/b/j.1/secret,1"))
    argv = argv_of(job, BuildPaths("/build/ctx", "/build/ctx", "/out/m.json", files))
    assert flags(argv, "--secret") == ["id=tok,src=/run/b/j.1/secret-0", 'id=npm,"src=/run/b/j.1/secret,1"']
    spec = launched(job, {"TOK": "v1", "NPM": "v2"}, secret_files=True)
    assert dict(spec.secrets) == {"tok": "v1", "npm": "v2"}
    assert spec.env == {"BUILDKIT_HOST": "tcp://bk:1234"}  # the values go as files, not variables
    j = job.job_id
    assert flags(spec.argv, "--secret") == [
        f"id=tok,src=/run/b/{j}/secret-0",
        f"id=npm,src=/run/b/{j}/secret-1",
    ]


def test_csv_quoting() -> None:
    assert csv_attrs(["a=1", 'b=x"y', "c=p,q"]) == 'a=1,"b=x""y","c=p,q"'
    assert csv_fields(csv_attrs(["a=1", 'b=x"y', "c=p,q"])) == ["a=1", 'b=x"y', "c=p,q"]
