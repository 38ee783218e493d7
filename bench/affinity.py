"""How often a rebuild finds its cache on the daemon that runs it, with cache affinity on and off.

Run by hand as root on a machine with genuine BuildKit v0.21.0 (not part of the tests):
    .venv/bin/python bench/affinity.py [--bins /work/buildkit-bin] [--projects 4] [--rebuilds 20] \
        [--change-source]

Redis: a ``redis-server`` of its own on a free port (tests/harness.py), or ``BUILDQ_TEST_REDIS``
(whose DBs ``--db`` and the next one it flushes: never name a Redis whose data you keep).

For each mode (affinity on, then off) it starts two fresh buildkitd (OCI worker, own roots), a
buildq worker (local launcher, one process) against both, builds each project once, then the
rebuilds one at a time, the projects in turn. Both modes start equal: fresh daemons, their own
repositories in one ``docker-registry`` (so no registry cache carries over), flushed Redis DBs.
A project is ``FROM busybox``, a RUN writing 8 MB of random data, a small RUN and a COPY.

A rebuild is a **local-cache hit** when every Dockerfile step but ``FROM`` is ``CACHED`` in its
record and the daemon that ran it already held the project's RUN step before the rebuild: built
there (``buildctl du`` lists ``mount / from exec … <the RUN command>``) or imported by an earlier
build there (``imported <digest of the project's RUN layer>``). Otherwise the steps came from the
registry cache: ``du`` shows the project's layers ``imported`` anew after it. (The stream itself
cannot tell: a step served by the registry cache is ``CACHED`` too, and BuildKit fetches the
``--import-cache`` manifest on every build.) With ``--change-source`` each rebuild changes the
copied file first, so the last step runs on top of the cached ones (then "all steps CACHED"
means all but that COPY).
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
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.genuine import Daemon, Registry, busybox_base  # noqa: E402
from tests.harness import WorkerProcess, base_env, client_for, flush_dbs  # noqa: E402

MANIFEST_TYPES = ",".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass
class Rebuild:
    project: str
    daemon: str
    routing: str
    seconds: float
    all_cached: bool
    held_before: bool

    @property
    def local_hit(self) -> bool:
        return self.all_cached and self.held_before


@dataclass
class Mode:
    name: str
    rebuilds: list[Rebuild] = field(default_factory=list)


def du(bins: Path, daemon: Daemon) -> list[str]:
    """The descriptions of the daemon's cache records."""
    out = subprocess.run(
        [str(bins / "buildctl"), "--addr", daemon.addr, "du", "--format", "{{json .}}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    return [str(r.get("description", "")) for r in (json.loads(out) if out else None) or []]


def run_layer(registry: Registry, repository: str) -> str:
    """Digest of the project's RUN layer (its image's second layer; the first is busybox)."""
    url = f"http://{registry.host}/v2/{repository}/manifests/1"
    request = urllib.request.Request(url, headers={"Accept": MANIFEST_TYPES})
    manifest = json.loads(urllib.request.urlopen(request, timeout=10).read())
    return str(manifest["layers"][1]["digest"])


def holds(descriptions: list[str], marker: str, layer: str) -> bool:
    return any(marker in d or d == f"imported {layer}" for d in descriptions)


def make_project(work: Path, base: str, name: str) -> Path:
    ctx = work / "projects" / name
    ctx.mkdir(parents=True)
    (ctx / "app.txt").write_text(f"{name} 0\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {base}\n"
        f"RUN echo project-{name} > /name && head -c 8000000 /dev/urandom > /blob\n"
        f"RUN echo second-step-{name} > /second\n"
        "COPY app.txt /app.txt\n"
    )
    return ctx


def run_mode(args: argparse.Namespace, name: str, affinity: bool, registry: Registry, base: str) -> Mode:
    bins: Path = args.bins
    work = Path(tempfile.mkdtemp(prefix=f"buildq-affinity-{name}-", dir=args.workdir))
    daemons = [Daemon(bins, work / f"bk{i}", registry) for i in (1, 2)]
    mode = Mode(name)
    worker = None
    try:
        env = base_env(
            args.db,
            f"aff{uuid.uuid4().hex[:8]}",
            BUILDQ_BUILDCTL_PATH=str(bins / "buildctl"),
            BUILDQ_BUILDKIT_HOSTS=",".join(d.addr for d in daemons),
            BUILDQ_INSECURE_REGISTRIES=registry.host,
            BUILDQ_LOCAL_STATE_DIR=str(work / "state"),
            BUILDQ_CACHE_AFFINITY="true" if affinity else "false",
        )
        flush_dbs(env)
        worker = WorkerProcess(env, concurrency=1, log_dir=work).wait_ready()
        client = client_for(env)
        names = [f"p{i}" for i in range(args.projects)]
        contexts = {p: make_project(work, base, p) for p in names}
        repos = {p: f"{name}/{p}" for p in names}
        layers = {}
        for p in names:
            record = client.submit(
                {"context": str(contexts[p]), "tags": [f"{registry.host}/{repos[p]}:1"]}
            ).wait(timeout=600)
            assert record["state"] == "succeeded", record.get("error")
            layers[p] = run_layer(registry, repos[p])
            print(
                f"  {name}: first build of {p} on {record['daemon']} ({record['duration_s']:.2f}s)",
                flush=True,
            )
        for i in range(args.rebuilds):
            p = names[i % len(names)]
            if args.change_source:
                (contexts[p] / "app.txt").write_text(f"{p} {i + 1}\n")
            before = {d.addr: du(bins, d) for d in daemons}
            record = client.submit(
                {"context": str(contexts[p]), "tags": [f"{registry.host}/{repos[p]}:1"]}
            ).wait(timeout=600)
            assert record["state"] == "succeeded", record.get("error")
            steps = record["steps"] or {}
            expected = steps.get("total", 0) - 1 - (1 if args.change_source else 0)  # FROM is never CACHED
            rebuild = Rebuild(
                project=p,
                daemon=record["daemon"],
                routing=record["routing"],
                seconds=record["duration_s"],
                all_cached=steps.get("cached", 0) >= expected,
                held_before=holds(before[record["daemon"]], f"project-{p}", layers[p]),
            )
            mode.rebuilds.append(rebuild)
            where = "local cache" if rebuild.local_hit else "registry cache"
            print(
                f"  {name}: rebuild {i + 1:2d} {p} on {rebuild.daemon} ({rebuild.routing}) "
                f"{rebuild.seconds:.2f}s {steps.get('cached')}/{steps.get('total')} cached, {where}",
                flush=True,
            )
    finally:
        if worker is not None:
            worker.stop()
        for daemon in daemons:
            daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return mode


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "–"


def report(modes: list[Mode]) -> None:
    print("\n| affinity | rebuilds | local-cache hits | share | median s | median s: local | registry |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        hits = [r for r in mode.rebuilds if r.local_hit]
        misses = [r for r in mode.rebuilds if not r.local_hit]
        share = len(hits) / len(mode.rebuilds) if mode.rebuilds else 0.0
        print(
            f"| {mode.name} | {len(mode.rebuilds)} | {len(hits)} | {share:.0%} "
            f"| {median([r.seconds for r in mode.rebuilds])} | {median([r.seconds for r in hits])} "
            f"| {median([r.seconds for r in misses])} |"
        )
    for mode in modes:
        reasons: dict[str, int] = {}
        for r in mode.rebuilds:
            reasons[r.routing] = reasons.get(r.routing, 0) + 1
        print(f"routing with affinity {mode.name}: {json.dumps(reasons, sort_keys=True)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--bins", type=Path, default=Path(os.environ.get("BUILDQ_TEST_BUILDKIT_BIN", "/work/buildkit-bin"))
    )
    parser.add_argument("--projects", type=int, default=4)
    parser.add_argument("--rebuilds", type=int, default=20)
    parser.add_argument("--db", type=int, default=2, help="Redis DB (and the next one) of BUILDQ_TEST_REDIS")
    parser.add_argument(
        "--change-source", action="store_true", help="change the copied file before each rebuild"
    )
    parser.add_argument("--modes", default="on,off", help="the modes in the order they run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the daemons' folders")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("buildkitd's OCI worker needs root", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="buildq-affinity-", dir=args.workdir))
    registry = Registry(work / "registry")
    modes: list[Mode] = []
    try:
        seed = Daemon(args.bins, work / "seed", registry)  # pushes the base image, then goes away
        try:
            base = busybox_base(args.bins, seed, registry, work)
        finally:
            seed.stop()
        for name in args.modes.split(","):
            print(f"affinity {name}", flush=True)
            modes.append(run_mode(args, name, name == "on", registry, base))
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
