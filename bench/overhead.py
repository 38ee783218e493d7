"""What buildq costs on top of the build: buildq vs a bare Celery task that spawns the same process.

Run by hand (not part of the tests):
    .venv/bin/python bench/overhead.py [--builds 300] [--bulk 700] [--rounds 3]

Both sides: a redis-server of the benchmark's own (a free port; ``--redis URL`` to use another),
a real worker (prefork, 2 processes, late acks,
prefetch 1, events on), and the same buildctl stand-in (bench/standin_exit.c, compiled here: it
writes the metadata file and exits at once, appending its own start/end time to BENCH_TIMES).
Figures: p50/p95/p99 of enqueue → buildctl start and buildctl exit → result readable (one build
at a time), builds per second (bulk), CPU time per build of each process (bulk), RSS of a worker
child after 30 builds and after the run (1,030 builds), and the ratio buildq / floor for each.
The sides take turns over several rounds (order alternating, a fresh worker each time), so drift
of the machine hits both alike; latency percentiles pool every round, the rest is the median.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT  # the checkout measured (--tree)

REDIS = ""  # set by main(): the benchmark's own redis-server, or --redis


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def compile_standin(workdir: Path) -> Path:
    exe = workdir / "buildctl"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "standin_exit.c")], check=True)
    return exe


def read_times(path: Path) -> list[tuple[float, float]]:
    out = []
    for line in path.read_text().splitlines():
        start, end = line.split()
        out.append((int(start) / 1e9, int(end) / 1e9))
    return out


def children_rss(pid: int) -> list[tuple[int, int, int]]:
    """(child pid, VmRSS kB, VmHWM kB) of each pool process."""
    out = []
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for kid in kids:
        fields = {}
        for line in Path(f"/proc/{kid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "VmRSS" in fields:
            out.append((int(kid), int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])))
    return out


def cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the worker's parent, its pool children, Redis and this process."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.redis_pid = int(redis.Redis.from_url(REDIS).info("server")["process_id"])

    def read(self) -> dict[str, float]:
        kids = subprocess.run(["pgrep", "-P", str(self.worker_pid)], capture_output=True, text=True)
        return {
            "worker parent": cpu_s(self.worker_pid),
            "worker children": sum(cpu_s(int(k)) for k in kids.stdout.split()),
            "redis-server": cpu_s(self.redis_pid),
            "producer (this process)": sum(os.times()[:2]),
        }


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        cwd=TREE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class Side:
    """One side of the comparison: how to submit one job and wait for its result."""

    name = ""

    def submit(self, job_id: str) -> object: ...

    def wait(self, handle: object) -> None: ...


class BuildqSide(Side):
    name = "buildq"

    def __init__(self, env: dict[str, str], context: Path) -> None:
        from buildq.client import BuildqClient
        from buildq.config import load_settings

        self.client = BuildqClient(load_settings({k: v for k, v in env.items() if k.startswith("BUILDQ_")}))
        self.context = str(context)
        self.client.store.redis.ping()
        app = getattr(self.client, "app", None)  # older trees sent through Celery
        if app is not None:
            app.connection_for_write().ensure_connection()

    def submit(self, job_id: str) -> object:
        return self.client.submit(
            {"job_id": job_id, "context": self.context, "tags": [f"reg:5000/bench/{job_id}:1"]}
        )

    def wait(self, handle: object) -> None:
        record = handle.wait(timeout=60)  # type: ignore[attr-defined]
        assert record["state"] == "succeeded", record


class FloorSide(Side):
    name = "floor"

    def __init__(self, env: dict[str, str]) -> None:
        os.environ.update({k: v for k, v in env.items() if k.startswith("FLOOR_")})
        from bench.floor_app import app

        self.app = app
        self.queue = env["FLOOR_QUEUE"]
        app.connection_for_write().ensure_connection()

    def submit(self, job_id: str) -> object:
        return self.app.send_task("floor.run", args=[job_id], task_id=job_id, queue=self.queue)

    def wait(self, handle: object) -> None:
        handle.get(timeout=60)  # type: ignore[attr-defined]


@dataclass
class Run:
    """One side's figures from one round."""

    to_start: list[float] = field(default_factory=list)
    to_result: list[float] = field(default_factory=list)
    builds_per_s: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)
    rss_early: list[tuple[int, int, int]] = field(default_factory=list)
    rss_end: list[tuple[int, int, int]] = field(default_factory=list)


def measure(
    side: Side,
    times_file: Path,
    builds: int,
    bulk: int,
    worker_pid: int,
    warmup: int = 30,
    gap_s: float = 0.02,
) -> Run:
    run = Run()
    for i in range(warmup):
        side.wait(side.submit(f"warm-{uuid.uuid4().hex[:8]}-{i}"))
    run.rss_early = children_rss(worker_pid)
    times_file.write_text("")
    for i in range(builds):
        time.sleep(gap_s)  # one build at a time: let the previous one's bookkeeping finish
        t_enq = time.time()
        handle = side.submit(f"one-{uuid.uuid4().hex[:8]}-{i}")
        side.wait(handle)
        t_done = time.time()
        ((start, end),) = read_times(times_file)[-1:]
        run.to_start.append(start - t_enq)
        run.to_result.append(t_done - end)
    cpu = CpuMeter(worker_pid)
    before = cpu.read()
    t0 = time.time()
    handles = [side.submit(f"bulk-{uuid.uuid4().hex[:8]}-{i}") for i in range(bulk)]
    for handle in handles:
        side.wait(handle)
    run.builds_per_s = bulk / (time.time() - t0)
    # CPU time per bulk build, by process: where the throughput goes
    run.cpu_ms = {name: (value - before[name]) / bulk * 1000 for name, value in cpu.read().items()}
    run.rss_end = children_rss(worker_pid)
    return run


def run_buildq(base: dict[str, str], work: Path, standin: Path, queue: str, args: argparse.Namespace) -> Run:
    env = {
        **base,
        "BUILDQ_BROKER_URL": f"{REDIS}/8",
        "BUILDQ_RESULT_BACKEND": f"{REDIS}/9",
        "BUILDQ_LAUNCHER": "local",
        "BUILDQ_BUILDCTL_PATH": str(standin),
        "BUILDQ_QUEUE": queue,
        "BUILDQ_HIGH_PRIORITY_QUEUE": queue + ".high",
    }
    env["PYTHONPATH"] = str(TREE)
    argv = [sys.executable, "-m", "buildq", "worker", "--concurrency", "2", "--pool", "prefork"]
    worker = start([*argv, "--loglevel", "INFO"], env, work / "buildq-worker.log")
    try:
        side = BuildqSide(env, work / "ctx")
        return measure(side, work / "times", args.builds, args.bulk, worker.pid, gap_s=args.gap_ms / 1000)
    finally:
        stop(worker)


def run_floor(base: dict[str, str], work: Path, standin: Path, queue: str, args: argparse.Namespace) -> Run:
    env = {
        **base,
        "FLOOR_BROKER_URL": f"{REDIS}/8",
        "FLOOR_RESULT_BACKEND": f"{REDIS}/9",
        "FLOOR_STANDIN": str(standin),
        "FLOOR_QUEUE": queue + ".floor",
        "PYTHONPATH": str(ROOT),
    }
    argv = [sys.executable, "-m", "celery", "-A", "bench.floor_app", "worker", "--concurrency", "2"]
    argv += ["--pool", "prefork", "--events", "--prefetch-multiplier", "1", "--without-gossip"]
    argv += ["--without-mingle", "-Q", env["FLOOR_QUEUE"], "--loglevel", "INFO"]
    worker = start(argv, env, work / "floor-worker.log")
    try:
        side = FloorSide(env)
        return measure(side, work / "times", args.builds, args.bulk, worker.pid, gap_s=args.gap_ms / 1000)
    finally:
        stop(worker)


def figures(runs: list[Run]) -> dict[str, float]:
    """Latency percentiles over every round's samples; throughput and CPU: the median round."""
    out = {"builds_per_s": statistics.median(r.builds_per_s for r in runs)}
    for name in runs[0].cpu_ms:
        out[f"cpu_ms_per_build {name}"] = statistics.median(r.cpu_ms[name] for r in runs)
    for label in ("to_start", "to_result"):
        values = [v for r in runs for v in getattr(r, label)]
        title = {"to_start": "enqueue_to_start", "to_result": "exit_to_result"}[label]
        for p in (50, 95, 99):
            out[f"{title}_p{p}_ms"] = pct(values, p) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=300, help="one-at-a-time builds per side and round")
    parser.add_argument("--bulk", type=int, default=700, help="builds submitted at once per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each side in turn (order alternates)")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="pause between one-at-a-time builds")
    parser.add_argument("--redis", help="a Redis URL to use (default: start a redis-server of its own)")
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose buildq is measured")
    args = parser.parse_args()
    global REDIS, TREE
    TREE = Path(args.tree).resolve()
    sys.path.insert(0, str(TREE))
    own = None
    if args.redis:
        REDIS = args.redis.rstrip("/")
    else:
        own = start_redis(Path(tempfile.mkdtemp(prefix="buildq-bench-redis-")))
        REDIS = own[0]
    try:
        run_all(args)
    finally:
        if own is not None:
            subprocess.run(["redis-cli", "-p", own[1], "shutdown", "nosave"], capture_output=True)


def start_redis(folder: Path) -> tuple[str, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--port", port, "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder), "--databases", "16"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        try:
            if redis.Redis(port=int(port)).ping():
                return f"redis://127.0.0.1:{port}", port
        except redis.RedisError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def run_all(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="buildq-bench-"))
    standin = compile_standin(work)
    (work / "ctx").mkdir()
    (work / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    queue = f"bench{uuid.uuid4().hex[:6]}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BUILDQ_", "FLOOR_"))}
    base["BENCH_TIMES"] = str(work / "times")
    runs: dict[str, list[Run]] = {"buildq": [], "floor": []}
    sides = {"buildq": run_buildq, "floor": run_floor}
    for round_no in range(args.rounds):
        order = ["buildq", "floor"] if round_no % 2 == 0 else ["floor", "buildq"]
        for name in order:
            for db in (8, 9):
                redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
            run = sides[name](base, work, standin, queue, args)
            runs[name].append(run)
            print(f"round {round_no + 1} {name}: {run.builds_per_s:.0f} builds/s", flush=True)

    results = {name: figures(rs) for name, rs in runs.items()}
    per_worker = 30 + args.builds + args.bulk
    print(
        f"\n{args.rounds} rounds × {per_worker} builds per side ({args.builds} one at a time, "
        f"{args.bulk} in bulk), 2 prefork processes; a fresh worker each round\n"
    )
    print("| figure | buildq | floor | buildq / floor |")
    print("|---|---|---|---|")
    for key in results["floor"]:
        b, f = results["buildq"][key], results["floor"][key]
        unit = "" if key == "builds_per_s" else " ms"
        print(f"| {key.removesuffix('_ms')} | {b:.2f}{unit} | {f:.2f}{unit} | {b / f:.2f} |")
    for name, rs in runs.items():
        for label, rows in (("after 30 builds", rs[-1].rss_early), (f"after {per_worker}", rs[-1].rss_end)):
            for pid, cur, peak in rows:
                mb = f"RSS {cur / 1024:.1f} MB, peak {peak / 1024:.1f} MB"
                print(f"{name} worker child {pid} {label}: {mb}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
