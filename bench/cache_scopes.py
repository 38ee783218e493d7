"""Scoped cache refs against one shared ref, on genuine buildctl/buildkitd v0.21.0 and a real registry.

A project whose two branches (``main`` and a pull request) differ in a late layer (a ``COPY`` of a
file two steps before the end) is built alternately main, PR, main, PR … (``--builds``, default 10)
twice: once with one shared cache ref for every build (buildq without ``cache_scope``), once with
scoped refs and the fallback to ``main`` (``cache_scope`` = the branch, ``BUILDQ_CACHE_DEFAULT_SCOPE
=main``). The argv is buildq's own (:func:`buildq.buildkit.command.build_argv` from
:func:`buildq.contract.job.cache_refs`); the daemon's local cache is pruned (``buildctl prune --all``)
before every build, so what is cached came from the registry cache, as on a fresh or another
daemon. Then the first build of a new branch (a third scope, never exported) on the scoped refs.

Prints, per mode, each build's steps cached/total and the mean steps-cached ratio; for the new
branch which steps came from the cache. Needs root, ``docker-registry``, ``busybox-static``, runc::

    BUILDQ_TEST_BUILDKIT_BIN=/root/buildkit-rig/bin .venv/bin/python bench/cache_scopes.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buildq.buildkit.command import BuildRequest, build_argv  # noqa: E402
from buildq.buildkit.phases import cache_evidence, is_step, step_stats  # noqa: E402
from buildq.buildkit.progress import ProgressTracker  # noqa: E402
from buildq.contract.job import cache_refs, parse_job  # noqa: E402
from tests.genuine import Daemon, Registry, bin_dir, busybox_base  # noqa: E402
from tests.test_cache_scopes_genuine import project  # noqa: E402 - the same project as the test


def build(bins: Path, daemon: Daemon, registry: Registry, job: dict[str, Any], default_scope: str | None,
          work: Path) -> dict[str, Any]:  # fmt: skip
    """One genuine build of ``job`` with buildq's argv, after pruning the daemon's local cache."""
    subprocess.run([str(bins / "buildctl"), "--addr", daemon.addr, "prune", "--all"], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    parsed = parse_job(job)
    export_ref, import_refs = cache_refs(parsed, default_scope)
    meta = work / "metadata.json"
    argv = build_argv(
        BuildRequest(
            tags=parsed.tags, cache_ref=export_ref, import_refs=import_refs, metadata_file=str(meta),
            context_dir=parsed.context, dockerfile_dir=parsed.context,
        ),
        insecure_registries=[registry.host],
    )  # fmt: skip
    proc = subprocess.run([str(bins / "buildctl"), "--addr", daemon.addr, *argv], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"buildctl failed ({proc.returncode}): {proc.stderr[-2000:]}")
    tracker = ProgressTracker()
    for line in proc.stderr.splitlines():
        tracker.feed(line)
    stats = step_stats(tracker)
    evidence = cache_evidence(tracker.vertices.values(), None, export_requested=True, succeeded=True)
    steps = [v for v in tracker.vertices.values() if is_step(v.name) and (v.runs or v.cached)]
    return {
        "scope": parsed.cache_scope, "imports": import_refs, "export": export_ref, "stats": stats,
        "import_error": evidence.import_error,
        "cached_steps": sorted(v.name for v in steps if v.cached),
        "executed_steps": sorted(v.name for v in steps if not v.cached),
    }  # fmt: skip


def ratio(result: dict[str, Any]) -> float:
    """Steps cached / steps that count (a FROM is resolved, never cached: left out)."""
    stats = result["stats"]
    counted = int(stats["total"]) - 1
    return int(stats["cached"]) / counted if counted else 0.0


def alternate(bins: Path, daemon: Daemon, registry: Registry, base: str, work: Path, builds: int,
              scoped: bool) -> list[dict[str, Any]]:  # fmt: skip
    repo = f"{registry.host}/bench/{'scoped' if scoped else 'shared'}"
    out = []
    for n in range(builds):
        branch = "main" if n % 2 == 0 else "pr-1"
        job: dict[str, Any] = {"context": str(project(work, base, branch)), "tags": [f"{repo}:{branch}"]}
        if scoped:
            job["cache_scope"] = branch
        result = build(bins, daemon, registry, job, "main" if scoped else None, work)
        result["branch"] = branch
        out.append(result)
        s = result["stats"]
        print(f"  {'scoped' if scoped else 'shared'} build {n + 1:2d} ({branch:4s}): "
              f"{s['cached']}/{int(s['total']) - 1} steps cached, imports {', '.join(result['imports'])}",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--builds", type=int, default=10)
    args = parser.parse_args()
    bins = bin_dir()
    if bins is None:
        raise SystemExit("set BUILDQ_TEST_BUILDKIT_BIN to the folder of genuine buildctl and buildkitd")
    work = Path(tempfile.mkdtemp(prefix="buildq-bench-scopes-"))
    registry = Registry(work / "registry")
    daemon = Daemon(bins, work / "buildkitd", registry)
    try:
        base = busybox_base(bins, daemon, registry, work)
        print(f"buildctl/buildkitd {bins}; registry {registry.host}; {args.builds} builds per mode")
        results = {}
        for scoped in (False, True):
            results[scoped] = alternate(bins, daemon, registry, base, work, args.builds, scoped)
        print()
        for scoped, label in ((False, "one shared ref"), (True, "scoped refs + fallback to main")):
            rows = results[scoped]
            cached = sum(int(r["stats"]["cached"]) for r in rows)
            counted = sum(int(r["stats"]["total"]) - 1 for r in rows)
            later = rows[2:]  # from the second build of each branch on
            later_ratio = sum(ratio(r) for r in later) / len(later) if later else 0.0
            print(f"{label:32s}: steps cached {cached}/{counted} = {cached / counted:.2f} over all "
                  f"{len(rows)} builds; mean ratio from build 3 on {later_ratio:.2f}")  # fmt: skip
        repo = f"{registry.host}/bench/scoped"
        job = {"context": str(project(work, base, "pr-2")), "tags": [f"{repo}:pr-2"], "cache_scope": "pr-2"}
        first = build(bins, daemon, registry, job, "main", work)
        print(f"\nfirst build of a new branch (pr-2, imports {', '.join(first['imports'])}): "
              f"{first['stats']['cached']}/{int(first['stats']['total']) - 1} steps cached "
              f"(ratio {ratio(first):.2f}), import error: {first['import_error']}")  # fmt: skip
        print("  cached:   " + "; ".join(first["cached_steps"]))
        print("  executed: " + "; ".join(first["executed_steps"]))
    finally:
        daemon.stop()
        registry.stop()
        if os.environ.get("BENCH_KEEP") != "1":
            subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
