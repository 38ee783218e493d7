"""Cache scopes on genuine buildctl/buildkitd v0.21.0 and a real registry, through the queue (opt-in:
``buildkit`` marker; ``BUILDQ_TEST_BUILDKIT_BIN``, see tests/genuine.py).

Ten builds of one scope submitted at once (ten commits of ``main``, each its own late layer), run
by a worker of four pool processes under the export lease, leave a cache manifest that a following
build on a daemon with an empty local cache imports without error; the first build of a new branch
imports ``main``'s cache (the steps before the change come from it). The daemon's local cache is
pruned before each checked build, so what is cached came from the registry.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.genuine import bin_dir
from tests.harness import client_for
from tests.test_buildkit_genuine import deployment
from tests.test_buildkit_genuine import genuine as genuine_rig

#: the genuine buildkitd + registry fixture of tests/test_buildkit_genuine.py
genuine = genuine_rig

pytestmark = [
    pytest.mark.buildkit,
    pytest.mark.skipif(bin_dir() is None, reason="BUILDQ_TEST_BUILDKIT_BIN is not set (genuine BuildKit)"),
]

#: four steps every branch shares, then the late layer that differs, and a step after it
DOCKERFILE = """FROM {base}
RUN echo one > /one && sleep 1
RUN echo two > /two && sleep 1
RUN echo three > /three && sleep 1
RUN echo four > /four && sleep 1
COPY branch.txt /branch.txt
RUN cat /branch.txt > /derived && sleep 1
"""
SHARED_STEPS = 4


def project(root: Path, base: str, branch: str) -> Path:
    """The project as ``branch`` has it: the same Dockerfile, ``branch.txt`` differs."""
    ctx = root / f"ctx-{branch}"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(base=base))
    (ctx / "branch.txt").write_text(f"the {branch} branch\n")
    return ctx


def prune(g: dict[str, Any]) -> None:
    """Empty the daemon's local cache: what a build finds cached then came from the registry."""
    subprocess.run([str(g["bins"] / "buildctl"), "--addr", g["daemon"].addr, "prune", "--all"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip


def build(client: Any, g: dict[str, Any], root: Path, branch: str, tag: str, scope: str) -> Any:
    """Submit the project as ``branch`` has it; its handle."""
    repo = f"{g['registry'].host}/scopes/app"
    context = str(project(root, g["base"], branch))
    return client.submit({"context": context, "tags": [f"{repo}:{tag}"], "cache_scope": scope})


@pytest.mark.parametrize("wait_s", ["30", "0"])
def test_ten_concurrent_builds_of_one_ref_leave_a_cache_the_next_build_imports(
    genuine, tmp_path, start_worker, wait_s
) -> None:
    env = {**deployment(genuine, tmp_path, 8), "BUILDQ_CACHE_DEFAULT_SCOPE": "main",
           "BUILDQ_CACHE_EXPORT_WAIT_S": wait_s, "BUILDQ_BUILDKIT_MAX_BUILDS": "4"}  # fmt: skip
    start_worker(env, concurrency=4)
    client = client_for(env)
    t0 = time.monotonic()
    handles = [build(client, genuine, tmp_path, f"main-{n}", f"c{n}", "main") for n in range(10)]
    records = [h.wait(timeout=600) for h in handles]
    wall = time.monotonic() - t0
    assert [r["state"] for r in records] == ["succeeded"] * 10, [r["error"] for r in records]
    exports = [r["cache"]["export"] for r in records]
    assert "exported" in exports and not {"failed"} & set(exports)
    if wait_s != "0":  # the newest commit waits for the older exporters and exports last
        assert exports[-1] == "exported"
    prune(genuine)
    after = build(client, genuine, tmp_path, "main-9", "next", "main").wait(timeout=300)
    assert after["state"] == "succeeded", after["error"]
    assert after["cache"]["imported"] is True and after["cache"]["import_error"] is None
    assert after["steps"]["cached"] >= SHARED_STEPS
    counts = {e: exports.count(e) for e in sorted(set(exports))}
    print(f"\nBUILDQ_CACHE_EXPORT_WAIT_S={wait_s}: ten builds of one ref in {wall:.1f}s, exports {counts}; "
          f"the next build (the newest commit again) imported the cache: "
          f"{after['steps']['cached']}/{after['steps']['total'] - 1} steps cached")  # fmt: skip


def test_the_first_build_of_a_new_branch_imports_main_s_cache(genuine, tmp_path, start_worker) -> None:
    env = {**deployment(genuine, tmp_path, 9), "BUILDQ_CACHE_DEFAULT_SCOPE": "main"}
    start_worker(env, concurrency=1)
    client = client_for(env)
    repo = f"{genuine['registry'].host}/scopes/app"
    main = build(client, genuine, tmp_path, "main", "main", "main").wait(timeout=300)
    assert main["state"] == "succeeded" and main["cache"]["export"] == "exported"
    prune(genuine)
    first = build(client, genuine, tmp_path, "pr-9", "pr-9", "feature/PR-9").wait(timeout=300)
    assert first["state"] == "succeeded", first["error"]
    assert first["cache"]["imports"] == [f"{repo}:buildcache-feature-pr-9", f"{repo}:buildcache-main"]
    assert first["cache"]["import_error"] is None  # its own scope's ref is a miss, not an error
    assert first["steps"]["cached"] == SHARED_STEPS, first["steps"]  # every step before the change
    assert first["cache"]["ref"] == f"{repo}:buildcache-feature-pr-9"
    assert first["cache"]["export"] == "exported"
    print(f"\nfirst build of a new branch: {first['steps']['cached']}/{first['steps']['total'] - 1} steps "
          "cached from main's ref")  # fmt: skip
