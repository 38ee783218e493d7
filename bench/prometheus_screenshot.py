"""The screenshot of docs/operations-kit.md: Debian's Prometheus scraping a live buildq worker
during a run, its graph page photographed by headless Chromium.

    apt-get install -y prometheus chromium
    .venv/bin/python bench/prometheus_screenshot.py docs/operations-kit-prometheus.png

Everything it starts is its own (a redis-server on a free port, one worker with the buildctl
stand-in, Prometheus and Chromium with their own folders and ports) and is stopped at the end.
The run: 8 short builds (one fails, one is retried), then 2 builds that hang on a daemon with 2
slots (it is full), then 3 more that wait in the queue; 100 s later the queries below are read from
Prometheus's API (printed) and the page is photographed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import FIXTURES, scenario  # noqa: E402
from tests.harness import WorkerProcess, base_env, client_for, flush_dbs, free_port, wait_until  # noqa: E402
from tests.standin import write_standin_executable  # noqa: E402

QUERIES = (
    "max by (queue) (buildq_queue_depth)",
    "max(buildq_builds_running)",
    "max by (daemon) (buildq_daemon_slots_in_use)",
    "max(buildq_daemons_full)",
    "max(buildq_queue_oldest_age_seconds)",
)


def main(out_png: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="buildq-screenshot-"))
    standin = write_standin_executable(tmp / "bin")
    ctx = tmp / "ctx"
    shutil.copytree(FIXTURES / "contexts" / "ctx", ctx)
    (ctx / "app").mkdir()
    metrics_port, prometheus_port = free_port(), free_port()
    env = base_env(
        5, "builds", BUILDQ_BUILDCTL_PATH=str(standin), BUILDQ_METRICS_PORT=str(metrics_port),
        BUILDQ_METRICS_DIR=str(tmp / "metrics"), BUILDQ_BUILDKIT_MAX_BUILDS="2",
    )  # fmt: skip
    env["BUILDQ_HIGH_PRIORITY_QUEUE"] = "builds.high"
    flush_dbs(env)
    worker = WorkerProcess(env, concurrency=2, log_dir=tmp, name="w1").wait_ready()
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        f"rule_files: [{ROOT / 'deploy/prometheus/alerts.yml'}]\n"
        "scrape_configs:\n  - job_name: buildq-worker\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/tsdb",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=(tmp / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = client_for(env)

    def job(tag: str, **spec: object) -> object:
        body: dict[str, object] = {"context": str(ctx), "tags": [f"registry:5000/demo/{tag}"]}
        if spec:
            body["build_args"] = {"STANDIN_SCENARIO": scenario(**spec)}
        return client.submit(body)

    waiting: list = []
    try:
        time.sleep(20)  # a flat start on the graphs
        quick = [job(f"app{i}:1", kind="succeed", pace=1.0) for i in range(6)]
        quick.append(job("broken:1", kind="fail", error="failed to solve: dockerfile parse error on line 1"))
        quick.append(
            job("flaky:1", kind="flaky", state_dir=str(tmp / "st"), fail_first=1, key="demo", seed=6)
        )
        for handle in quick:
            handle.wait(timeout=120)  # type: ignore[attr-defined]
        time.sleep(20)
        waiting = [job(f"long{i}:1", kind="hang") for i in range(2)]
        wait_until(lambda: all(h.status()["state"] == "running" for h in waiting), timeout=60)
        time.sleep(20)
        waiting += [job(f"next{i}:1", kind="hang") for i in range(3)]
        time.sleep(100)
        params: dict[str, str] = {}
        for i, query in enumerate(QUERIES):
            params.update(
                {f"g{i}.expr": query, f"g{i}.tab": "0", f"g{i}.range_input": "4m", f"g{i}.stacked": "0"}
            )
        base = f"http://127.0.0.1:{prometheus_port}"
        for query in QUERIES:
            answer = urllib.request.urlopen(
                f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            )
            print(query, "=>", answer.read().decode())
        # tall enough for the whole page: the graph page focuses its last query, which must not scroll
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp}/chrome", "--hide-scrollbars", "--window-size=1300,3900",
             "--virtual-time-budget=20000",
             f"--screenshot={out_png.resolve()}", f"{base}/graph?" + urllib.parse.urlencode(params)],
            check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=(tmp / "chromium.log").open("wb"),
        )  # fmt: skip
    finally:
        for handle in waiting:
            handle.cancel()
        for handle in waiting:
            try:
                handle.wait(timeout=60)
            except TimeoutError:
                pass
        prometheus.send_signal(signal.SIGTERM)
        prometheus.wait(30)
        worker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
