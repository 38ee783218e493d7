"""What buildq costs Redis, per build and as the fleet, the backlog and the history grow.

Run by hand (not part of the tests):
    .venv/bin/python bench/redis_cost.py [--builds 200] [--running 8] [--only NAME ...]

Everything runs against a redis-server of the benchmark's own (a free port), so ``INFO
commandstats`` counts buildq alone; commands run inside Lua scripts are counted by their own
names (that is what the server executes). Parts (``--only``):

- ``build``    a real ``buildq worker`` (2 pool processes, metrics on, janitor and daemon watch on)
               runs ``--builds`` builds of the stand-in replaying a genuine capture (39 progress
               lines, paced to ~1 s); commands per build (total, by command, and with the idle
               worker's own background subtracted) and bytes per finished build (``MEMORY USAGE``
               of every key, by kind) once the worker archived the logs.
- ``running``  ``--running`` builds printing a line every ~0.8 s for 30 s, all running at once:
               commands/s per running build (the idle worker's rate subtracted).
- ``claim``    the claim script's server time (``usec_per_call``) with 1 / 100 / 1,000 daemons,
               each daemon holding builds.
- ``janitor``  one janitor pass (wall and server time) with 0 / 20,000 jobs queued.
- ``cli``      ``buildq status`` and ``buildq list --state failed`` (10,000 recent jobs) times.
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
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buildq.config import Settings  # noqa: E402
from tests.harness import (  # noqa: E402 - a redis-server of the benchmark's own starts here
    REDIS_URL,
    WorkerProcess,
    base_env,
    client_for,
    flush_dbs,
    free_port,
    wait_until,
)
from tests.standin import FIXTURES, write_standin_executable  # noqa: E402

CAPTURE_S = 0.592  # ctx_oci_rawjson_cold: 39 rawjson lines over 0.592 s


def server() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL + "/0")


def commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec)."""
    out = {}
    for name, stats in r.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = (int(stats["calls"]), int(stats["usec"]))
    return out


def delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> Counter[str]:
    return Counter({k: v[0] - before.get(k, (0, 0))[0] for k, v in after.items()} | {})


BENCH_CMDS = {
    "info",
    "config|resetstat",
    "config",
    "memory|usage",
    "scan",
    "flushdb",
    "select",
    "ping",
    "client|setinfo",
    "hello",
    "dbsize",
    "type",
}


def buildq_only(counts: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in counts.items() if k not in BENCH_CMDS and v > 0})


def deployment(tmp: Path, db: int, **extra: str) -> dict[str, str]:
    standin = write_standin_executable(tmp / "bin")
    env = base_env(db, f"rc{uuid.uuid4().hex[:6]}", BUILDQ_BUILDCTL_PATH=str(standin), **extra)
    env["BUILDQ_LOCAL_STATE_DIR"] = str(tmp / f"state-{db}")
    env["BUILDQ_LEASE_TTL_S"] = "30"  # the production default
    env.pop("BUILDQ_RETRY_BACKOFF_BASE_S", None)
    env.pop("BUILDQ_RETRY_BACKOFF_CAP_S", None)
    flush_dbs(env)
    return env


def context(tmp: Path) -> Path:
    ctx = tmp / "ctx"
    if not ctx.exists():
        shutil.copytree(FIXTURES / "contexts" / "ctx", ctx)
    return ctx


def job(ctx: Path, repo: str = "app", **scenario: Any) -> dict[str, Any]:
    spec = json.dumps({"kind": "succeed", **scenario}, separators=(",", ":"))
    return {
        "context": str(ctx),
        "tags": [f"127.0.0.1:5000/cost/{repo}:{uuid.uuid4().hex[:6]}"],
        "build_args": {"STANDIN_SCENARIO": spec},
    }


def idle_rate(r: redis.Redis, seconds: float) -> tuple[float, Counter[str]]:
    before = commandstats(r)
    time.sleep(seconds)
    counts = buildq_only(delta(commandstats(r), before))
    return sum(counts.values()) / seconds, counts


def key_kind(key: str) -> str:
    if key.startswith("buildq:"):
        rest = key[len("buildq:") :]
        return "buildq:" + rest.split(":", 1)[0] + (":*" if ":" in rest else "")
    if key.startswith("celery-task-meta-"):
        return "celery-task-meta-*"
    if key.startswith("_kombu"):
        return "_kombu*"
    return key


def memory_by_kind(env: dict[str, str]) -> tuple[int, Counter[str], Counter[str]]:
    total, sizes, counts = 0, Counter[str](), Counter[str]()
    urls = {env["BUILDQ_BROKER_URL"], env.get("BUILDQ_RESULT_BACKEND", env["BUILDQ_BROKER_URL"])}
    for url in urls:
        r = redis.Redis.from_url(url)
        for key in r.scan_iter(count=1000):
            size = r.memory_usage(key, samples=0) or 0
            kind = key_kind(key.decode())
            sizes[kind] += size
            counts[kind] += 1
            total += size
    return total, sizes, counts


def part_build(tmp: Path, n: int, repos: int = 1) -> None:
    print(f"\n== build: {n} builds of ~1 s, 39 progress lines each, over {repos} repositories in turn")
    metrics_port = free_port()
    env = deployment(tmp, 2, BUILDQ_METRICS_PORT=str(metrics_port), BUILDQ_METRICS_DIR=str(tmp / "m"))
    if "archive_dir" in Settings.model_fields:  # older checkouts have no archive
        env["BUILDQ_ARCHIVE_DIR"] = str(tmp / "archive")
        env["BUILDQ_LOG_ARCHIVED_TTL_S"] = "2"  # measured once the archived logs left Redis
    ctx = context(tmp)
    worker = WorkerProcess(env, concurrency=2, log_dir=tmp)
    worker.wait_ready()
    r = server()
    try:
        client = client_for(env)
        client.submit(job(ctx, pace=0.01)).wait(timeout=60)  # warm both sides
        time.sleep(2)
        rate, idle_counts = idle_rate(r, 10)
        before = commandstats(r)
        t0 = time.monotonic()
        handles = [client.submit(job(ctx, f"app-{i % repos}", pace=1.0 / CAPTURE_S)) for i in range(n)]
        states = Counter(h.wait(timeout=600)["state"] for h in handles)
        elapsed = time.monotonic() - t0
        counts = buildq_only(delta(commandstats(r), before))
        total = sum(counts.values())
        background = rate * elapsed
        print(f"states: {dict(states)}  elapsed {elapsed:.1f} s")
        print(f"idle worker background: {rate:.2f} commands/s ({dict(idle_counts.most_common(6))})")
        print(
            f"commands per build: {total / n:.1f} total, {(total - background) / n:.1f} "
            "without the idle background"
        )
        print("  by command:", ", ".join(f"{k} {v / n:.2f}" for k, v in counts.most_common(16)))
        time.sleep(3)  # the last archive writes (the worker archives as each build ends)
        total_bytes, sizes, kinds = memory_by_kind(env)
        print(
            f"Redis bytes per finished build: {total_bytes / n / 1024:.2f} KB "
            f"({total_bytes / 1024:.0f} KB for {n + 1} builds)"
        )
        for kind, size in sizes.most_common(12):
            print(f"  {kind:28} {kinds[kind]:6} keys {size / n / 1024:8.2f} KB/build")
    finally:
        worker.stop()


def part_running(tmp: Path, k: int) -> None:
    print(f"\n== running: {k} builds printing a line every ~0.8 s, all at once")
    env = deployment(tmp, 4, BUILDQ_BUILDKIT_MAX_BUILDS=str(k))
    ctx = context(tmp)
    worker = WorkerProcess(env, concurrency=k, log_dir=tmp)
    worker.wait_ready()
    r = server()
    try:
        client = client_for(env)
        client.submit(job(ctx, pace=0.01)).wait(timeout=60)
        time.sleep(2)
        rate, _ = idle_rate(r, 10)
        handles = [client.submit(job(ctx, pace=40 / CAPTURE_S)) for _ in range(k)]
        store = client.store
        wait_until(lambda: all(store.info(h.job_id).get("state") == "running" for h in handles), 30)
        time.sleep(2)
        before = commandstats(r)
        window = 20.0
        time.sleep(window)
        counts = buildq_only(delta(commandstats(r), before))
        total = sum(counts.values())
        per = (total / window - rate) / k
        print(f"idle worker background {rate:.2f}/s; with {k} running: {total / window:.2f}/s")
        print(f"commands/s per running build: {per:.2f}")
        print(
            "  by command (per build per s):",
            ", ".join(f"{c} {v / window / k:.2f}" for c, v in counts.most_common(10)),
        )
        for h in handles:
            h.cancel()
    finally:
        worker.stop()


def part_claim() -> None:
    print("\n== claim: the claim script's server time by fleet size")
    from buildq.store.jobs import JobStore

    r = server()
    for fleet in (1, 100, 1000):
        r.flushdb()
        store = JobStore(r, result_ttl_s=3600)
        daemons = [f"tcp://10.0.{i // 250}.{i % 250}:1234" for i in range(fleet)]
        _register(store, daemons)
        # every daemon holds builds (3 of 4 slots) but one; claims land on it and on the others
        for i in range(len(daemons)):
            for b in range(3 if i else 0):
                store.claim(f"f{i}-{b}", **_claim_args(daemons, i, 4))
        samples = []
        for i in range(300):
            job_id = f"j{fleet}-{i}"
            before = commandstats(r).get("evalsha", (0, 0))
            reply = store.claim(job_id, **_claim_args(daemons, i, 10**6))
            after = commandstats(r)["evalsha"]
            samples.append(after[1] - before[1])
            assert getattr(reply, "daemon", None), reply
            _release(store, _fence(store, job_id, reply), reply.daemon)
        print(
            f"  {fleet:5} daemons: claim p50 {statistics.median(samples):6.0f} µs, "
            f"max {max(samples):6.0f} µs (server time, {len(samples)} claims)"
        )
    r.flushdb()


def _register(store: Any, daemons: list[str]) -> None:
    register = getattr(store, "register_daemons", None)
    if register is not None:
        register(daemons)


def _claim_args(daemons: list[str], prefer: int, limit: int) -> dict[str, Any]:
    import inspect

    from buildq.store.jobs import JobStore

    args: dict[str, Any] = dict(
        delivery=uuid.uuid4().hex,
        daemons=daemons,
        limit=limit,
        ttl_s=600,
        worker="bench:1",
        domain="bench",
        body="{}",
        queue="q",
    )
    if "prefer" in inspect.signature(JobStore.claim).parameters:  # an older checkout
        args["prefer"] = prefer
    return args


def _release(store: Any, fence: Any, daemon: str) -> None:
    import inspect

    if "daemon" in inspect.signature(store.release).parameters:  # an older checkout
        store.release(fence, daemon=daemon)
    else:
        store.release(fence)


def _fence(store: Any, job_id: str, reply: Any) -> Any:
    from buildq.store.jobs import Fence

    return Fence(job_id, reply.token, reply.gen)


def part_janitor() -> None:
    print("\n== janitor: one pass by backlog")
    from buildq.store.janitor import Janitor
    from buildq.store.jobs import JobStore

    r = server()
    for backlog in (0, 20000):
        r.flushdb()
        store = JobStore(r, result_ttl_s=3600)
        queue = "jan"
        for start in range(0, backlog, 1000):
            pipe_jobs = range(start, min(backlog, start + 1000))
            for i in pipe_jobs:
                message = json.dumps(
                    {"body": "e30=", "headers": {"id": f"q{i}"}, "properties": {"delivery_tag": f"t{i}"}}
                ).encode()
                store.submit(f"q{i}", queue=queue, message=message, tag=f"t{i}", delivery=f"d{i}", body="{}")
        janitor = Janitor(store, after_s=0.0)
        janitor.run_once()  # the first pass may take the deployment's janitor lease
        walls, servers = [], []
        for _ in range(5):
            before = commandstats(r)
            t0 = time.perf_counter()
            janitor.run_once()
            walls.append(time.perf_counter() - t0)
            after = commandstats(r)
            servers.append(sum(v[1] - before.get(k, (0, 0))[1] for k, v in after.items()) / 1e3)
        print(
            f"  {backlog:6} queued: pass {statistics.median(walls) * 1e3:7.1f} ms wall, "
            f"{statistics.median(servers):7.1f} ms of Redis (median of 5)"
        )
    r.flushdb()


def part_cli(tmp: Path) -> None:
    print("\n== cli: buildq status, buildq list --state failed over 10,000 recent jobs")
    env = deployment(tmp, 6)
    client = client_for(env)
    store = client.store
    ids = []
    for i in range(10000):
        job_id = f"l{i:05d}"
        message = json.dumps({"headers": {"id": job_id}}).encode()
        store.submit(job_id, queue="lq", message=message, tag=f"t{i}", delivery=f"d{i}", body="{}")
        ids.append(job_id)
    for i, job_id in enumerate(ids[::100]):
        store.reject(job_id, delivery=f"d{i * 100}", record=json.dumps({"job_id": job_id, "state": "failed"}))
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("BUILDQ_")}, **env}
    exe = str(Path(sys.executable).parent / "buildq")
    for argv in (["status", ids[5]], ["list", "--state", "failed", "--limit", "20"]):
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            subprocess.run([exe, *argv], env=cli_env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(
            f"  buildq {' '.join(argv[:1] + argv[1:2] if argv[0] == 'list' else argv[:1])}: "
            f"median {statistics.median(times) * 1e3:.0f} ms (7 runs)"
        )
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    before = commandstats(r)
    client.list_jobs(limit=20, states=["failed"])
    print(f"  list --state failed: {sum(buildq_only(delta(commandstats(r), before)).values())} commands")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument(
        "--repos", type=int, default=1,
        help="build: the builds' repositories, in turn (1: two builds of a ref run at once and one "
        "of them skips its export; 4: no two at once, every build exports)",
    )  # fmt: skip
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=["build", "running", "claim", "janitor", "cli"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="buildq-redis-cost-"))
    print(
        f"redis {REDIS_URL} ({redis.Redis.from_url(REDIS_URL).info('server')['redis_version']}), "
        f"checkout {ROOT}"
    )
    try:
        if "claim" in args.only:
            part_claim()
        if "janitor" in args.only:
            part_janitor()
        if "cli" in args.only:
            part_cli(tmp)
        if "build" in args.only:
            part_build(tmp, args.builds, args.repos)
        if "running" in args.only:
            part_running(tmp, args.running)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
