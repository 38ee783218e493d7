"""What the deployment's queue gauges cost in Redis (``buildq/store/lua/gauges.lua``).

    .venv/bin/python bench/gauges_cost.py

A redis-server of its own on a free port, filled like a busy deployment: 8 daemons x 4 slots all
in use (32 running jobs, older than every queued one), 5000 queued jobs, 500 of them waiting for a
daemon, 50 live workers. Then 200 calls as the lease holder (it computes) and 200 as another worker
(it reads the snapshot), each timed from the client (the round trip included).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buildq.store.gauges import read_gauges  # noqa: E402
from buildq.store.jobs import JobStore  # noqa: E402
from buildq.store.keys import QUEUED_INDEX, WAITING_INDEX, WORKERS, job_key, slot_key  # noqa: E402
from tests.harness import free_port, start_redis_server  # noqa: E402

DAEMONS = [f"tcp://bk{i}:1234" for i in range(8)]


def fill(r: redis.Redis) -> None:
    now = float(r.time()[0])
    ms = now * 1000
    pipe = r.pipeline(transaction=False)
    for i in range(32):
        pipe.zadd(QUEUED_INDEX, {f"run{i}": now - 3600 + i})
        pipe.hset(job_key(f"run{i}"), "state", "running")
        pipe.zadd(slot_key(DAEMONS[i % 8]), {f"t{i}": ms + 30000})
    for i in range(5000):
        pipe.zadd(QUEUED_INDEX, {f"q{i}": now - 1800 + i * 0.1})
        pipe.hset(job_key(f"q{i}"), mapping={"state": "queued", "phase": "queued"})
        pipe.lpush("builds", "x" * 100)
    for i in range(500):
        pipe.zadd(WAITING_INDEX, {f"q{i}": ms})
        pipe.hset(job_key(f"q{i}"), "phase", "waiting_for_daemon")
    for i in range(50):
        pipe.zadd(WORKERS, {f"w{i}": ms + 60000})
    pipe.execute()


def main() -> None:
    port, folder = free_port(), tempfile.mkdtemp()
    start_redis_server(port, "--save", "", "--appendonly", "no", "--dir", folder)
    r = redis.Redis(port=port)
    try:
        fill(r)
        store = JobStore(r, result_ttl_s=600)

        def call(worker: str) -> float:
            started = time.perf_counter()
            read_gauges(store, worker=worker, queue="builds", high_queue="builds.high", daemons=DAEMONS,
                        limit=4, lease_s=15)  # fmt: skip
            return time.perf_counter() - started

        computing = statistics.median(call("w0") for _ in range(200)) * 1000
        reading = statistics.median(call("w1") for _ in range(200)) * 1000
        print(f"lease holder (computes): median {computing:.3f} ms a call")
        print(f"another worker (reads the snapshot): median {reading:.3f} ms a call")
    finally:
        r.shutdown(nosave=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
