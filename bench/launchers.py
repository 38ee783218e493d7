"""Launch to result: the docker launcher against the local launcher (and bare buildctl).

Each side runs the same build, from ``Launcher.prepare`` to the metadata read and ``close()``
(what an attempt costs around buildctl); the sides take turns (the order rotates every round),
after a few warm-up builds each, and the medians are compared. Not part of the test run.

Sides: ``local`` (``LocalLauncher``), ``docker`` (warm container, the channel ``auto`` picks: fifo
on this machine), ``docker-exec`` (warm container, exec channel), ``docker-oneshot``
(``BUILDQ_DOCKER_WARM=false``), ``bare`` (``subprocess.run`` of buildctl, no launcher).

Stand-in (default): the busybox-sh stand-in, in ``buildq/buildctl-standin:test`` for the docker
sides and under the same busybox on the host for the others (run ``.ci/dockerd.sh`` first)::

    export "$(bash .ci/dockerd.sh | tail -n1)"; .venv/bin/python bench/launchers.py

Genuine: buildctl v0.21.0 on the host and in ``moby/buildkit:v0.21.0`` (``bench/buildkit_image.sh``),
a BuildKit daemon and a registry (``bench/genuine_env.sh start``); a warm rebuild of a small
multi-stage project, with image push and registry cache export::

    .venv/bin/python bench/launchers.py --genuine --buildctl /work/buildkit-bin/buildctl \\
        --addr "$(cat /tmp/buildq-bench-genuine/addr)" --registry "$(cat /tmp/buildq-bench-genuine/registry)"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buildq.buildkit.command import build_argv  # noqa: E402
from buildq.config import load_settings  # noqa: E402
from buildq.contract.job import BuildJob, parse_job  # noqa: E402
from buildq.engine.runner import build_request, dockerfile_dir  # noqa: E402
from buildq.launchers.base import BuildPaths, Launcher, LaunchSpec  # noqa: E402
from buildq.launchers.docker import DockerLauncher  # noqa: E402
from buildq.launchers.local import LocalLauncher  # noqa: E402

STANDIN = ROOT / "tests" / "standin" / "buildctl.sh"
FIXTURES = ROOT / "tests" / "fixtures" / "buildkit"
SIDES = ["local", "docker", "docker-exec", "docker-oneshot", "bare"]


def standin_on_host(work: Path) -> str:
    """The sh stand-in under busybox on the host, as in its image: applets first on PATH."""
    bindir, captures = work / "bin", work / "captures"
    bindir.mkdir()
    captures.mkdir()
    busybox = shutil.which("busybox")
    assert busybox, "busybox is needed"
    shutil.copy(busybox, bindir / "busybox")
    for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout.split():
        if applet != "busybox":
            (bindir / applet).symlink_to("busybox")
    line = next(x for x in STANDIN.read_text().splitlines() if x.startswith("# image-captures: "))
    for rel in line.removeprefix("# image-captures: ").split():
        shutil.copy(FIXTURES / rel, captures)
    exe = bindir / "buildctl"
    exe.write_text(f"#!{bindir}/sh\n" + STANDIN.read_text())
    exe.chmod(0o755)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    os.environ["STANDIN_CAPTURES"] = str(captures)
    return str(exe)


def genuine_project(work: Path, buildctl: str, addr: str, registry: str) -> Path:
    """A busybox base image in the registry and a small multi-stage project built once (cold)."""
    base = work / "base"
    rootfs = base / "rootfs"
    for d in ("bin", "etc", "tmp"):
        (rootfs / d).mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox, "busybox is needed"
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "cat", "ls", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (base / "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n")
    bare(buildctl, addr, base, f"type=image,name={registry}/bench/busybox:1,push=true,registry.insecure=true")
    ctx = work / "ctx"
    (ctx / "src").mkdir(parents=True)
    (ctx / "static").mkdir()
    for i in range(5):
        (ctx / "src" / f"part{i}.txt").write_text(f"part {i}\n" * 50)
        (ctx / "static" / f"asset{i}.css").write_text(f".c{i} {{ color: red }}\n" * 20)
    (ctx / "Dockerfile").write_text(
        f"FROM {registry}/bench/busybox:1 AS build\nCOPY src/ /src/\nRUN cat /src/*.txt > /out.txt\n"
        "FROM scratch\nCOPY --from=build /out.txt /out.txt\nCOPY static/ /static/\n"
    )
    return ctx


def bare(buildctl: str, addr: str, ctx: Path, output: str) -> None:
    argv = [buildctl, "--addr", addr, "build", "--frontend", "dockerfile.v0", "--local", f"context={ctx}",
            "--local", f"dockerfile={ctx}", "--output", output]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True)


def job_for(ctx: Path, registry: str, n: int, side: str) -> BuildJob:
    return parse_job(
        {"job_id": f"bench-{side}-{n}", "context": str(ctx), "tags": [f"{registry}/bench/app:1"]}
    )


def through_launcher(launcher: Launcher, job: BuildJob, addr: str, insecure: list[str]) -> float:
    started = time.perf_counter()
    paths = launcher.prepare(job.job_id, job.context, dockerfile_dir(job))
    argv = build_argv(build_request(job, paths), insecure_registries=insecure)
    spec = LaunchSpec(job.job_id, argv, {"BUILDKIT_HOST": addr}, job.context, dockerfile_dir(job))
    build = launcher.start(spec, paths)
    lines = list(build.lines())
    code = build.wait()
    metadata = build.read_metadata()
    build.close()
    took = time.perf_counter() - started
    if code != 0 or not metadata or "containerimage.digest" not in metadata:
        raise RuntimeError(f"build failed (rc {code}): {lines[-3:]}")
    return took


def through_bare(buildctl: str, job: BuildJob, addr: str, insecure: list[str], scratch: str) -> float:
    started = time.perf_counter()
    paths = BuildPaths(job.context, dockerfile_dir(job), f"{scratch}/{job.job_id}.json")
    argv = build_argv(build_request(job, paths), insecure_registries=insecure)
    env = {**os.environ, "BUILDKIT_HOST": addr}
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    proc = subprocess.run([buildctl, *argv], env=env, stderr=subprocess.PIPE, **quiet)
    with open(paths.metadata_file) as fh:
        metadata = json.load(fh)
    os.unlink(paths.metadata_file)
    took = time.perf_counter() - started
    if proc.returncode != 0 or "containerimage.digest" not in metadata:
        raise RuntimeError(f"bare build failed: {proc.stderr[-500:]!r}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--genuine", action="store_true")
    parser.add_argument("--buildctl", default="/work/buildkit-bin/buildctl")
    parser.add_argument("--image", default=None)
    parser.add_argument("--addr", default="tcp://127.0.0.1:12345")
    parser.add_argument("--registry", default="127.0.0.1:5065")
    parser.add_argument(
        "--docker-url", default=os.environ.get("DOCKER_HOST", "unix:///run/buildq-dockerd/docker.sock")
    )
    parser.add_argument("-n", "--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES))
    args = parser.parse_args()
    sides = args.sides.split(",")

    work = Path(tempfile.mkdtemp(prefix="buildq-bench-launchers-"))
    try:
        if args.genuine:
            buildctl, image = args.buildctl, args.image or "moby/buildkit:v0.21.0"
            ctx = genuine_project(work, buildctl, args.addr, args.registry)
            insecure = [args.registry]
        else:
            buildctl, image = standin_on_host(work), args.image or "buildq/buildctl-standin:test"
            ctx = work / "ctx"
            shutil.copytree(FIXTURES / "contexts" / "ctx", ctx)
            insecure = []
        settings: dict[str, Any] = {
            "launcher": "docker", "buildctl_image": image, "docker_url": args.docker_url,
            "docker_network": "host", "context_roots": [str(work)],
        }  # fmt: skip
        state = str(work / "state")
        launchers: dict[str, Launcher] = {
            "local": LocalLauncher(buildctl, state_dir=str(work / "local")),
            "docker": DockerLauncher(load_settings({}, **settings), state_dir=state),
            "docker-exec": DockerLauncher(load_settings({}, **settings), state_dir=state, channel="exec"),
            "docker-oneshot": DockerLauncher(
                load_settings({}, **settings, docker_warm=False), state_dir=state
            ),
        }
        times: dict[str, list[float]] = {side: [] for side in sides}
        n = 0

        def one(side: str) -> float:
            nonlocal n
            n += 1
            job = job_for(ctx, args.registry, n, side)
            if side == "bare":
                return through_bare(buildctl, job, args.addr, insecure, str(work))
            return through_launcher(launchers[side], job, args.addr, insecure)

        for side in sides:
            for _ in range(args.warmup):
                one(side)
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                times[side].append(one(side))
        channel = getattr(launchers["docker"].warm.box, "channel", "?")
        what = "genuine buildctl v0.21.0" if args.genuine else "stand-in"
        print(f"{what}: {args.rounds} rounds, sides in turn, {args.warmup} warm-up builds each; "
              f"docker side channel: {channel}")  # fmt: skip
        base = statistics.median(times["local"]) if "local" in times else None
        print(f"{'side':16} {'median s':>9} {'p90 s':>8} {'min s':>8} {'/ local':>8} {'paired':>8}")
        for side in sides:
            t = sorted(times[side])
            med = statistics.median(t)
            ratio = f"{med / base:8.2f}" if base else ""
            # the median of this side's time over local's in the same round (same load)
            pairs = [a / b for a, b in zip(times[side], times["local"], strict=True)] if base else []
            paired = f"{statistics.median(pairs):8.2f}" if pairs else ""
            print(f"{side:16} {med:9.4f} {t[int(0.9 * (len(t) - 1))]:8.4f} {t[0]:8.4f} {ratio} {paired}")
    finally:
        for launcher in locals().get("launchers", {}).values():
            if isinstance(launcher, DockerLauncher):
                launcher.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
