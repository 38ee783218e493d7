"""Test harness: real Redis, real ``buildq worker`` subprocesses, the buildctl stand-in.

Each :class:`WorkerProcess` is a genuine ``python -m buildq worker`` (prefork pool) with its own
environment; tests talk to it through :class:`buildq.client.BuildqClient` on the same Redis DBs.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

from buildq.client import BuildqClient
from buildq.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
#: the local launcher's pid and metadata files of this test run: never another deployment's
LOCAL_STATE_DIR = os.path.join(tempfile.gettempdir(), f"buildq-tests-{os.getpid()}")


class CountingRedis(redis.Redis):
    """A client that records its round trips in ``calls``: each command sent alone by its name,
    each pipeline as ``PIPELINE``."""

    calls: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.calls.append(str(args[0]))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        self.calls.append("PIPELINE")
        return super().pipeline(transaction, shard_hint)


def counting_client(url: str) -> Iterator[CountingRedis]:
    """A :class:`CountingRedis` on ``url``'s DB, flushed before and after (a fixture body)."""
    r = CountingRedis(connection_pool=redis.ConnectionPool.from_url(url))
    r.calls = []
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


#: what a terminal puts in a process's environment; a process the tests start never gets it (an
#: engine started with COLUMNS=80 cuts ``docker top``'s command lines at 32 characters). Python's
#: readline exports them at the C level, so a child started without an explicit ``env`` gets them.
TERMINAL_VARS = ("COLUMNS", "LINES")


def clean_environ(*drop_prefixes: str) -> dict[str, str]:
    """This process's environment for a process the tests start: without :data:`TERMINAL_VARS` and
    without the variables named with any of ``drop_prefixes``."""
    dropped = (lambda k: k.startswith(drop_prefixes)) if drop_prefixes else (lambda k: False)
    return {k: v for k, v in os.environ.items() if k not in TERMINAL_VARS and not dropped(k)}


def run_cli(
    env: Mapping[str, str], *args: str, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m buildq ARGS`` with exactly the given BUILDQ_* environment (``stdin``: its input)."""
    full = clean_environ("BUILDQ_")
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "buildq", *args],
        env=full,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis_server(port: int, *options: str) -> None:
    """Start a daemonized redis-server on 127.0.0.1:``port`` with ``options``; wait until it answers."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(f"Redis does not answer on 127.0.0.1:{port} and redis-server is not installed")
    subprocess.run(
        [exe, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port), *options], check=True
    )
    for _ in range(100):
        if redis_answers(f"redis://127.0.0.1:{port}"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"redis-server on port {port} did not start")


def require_tool(name: str, hint: str) -> str:
    """The path of program ``name``; a test without it is skipped on a developer's machine and
    fails in CI (``CI`` set, as ``.ci/run`` does), where everything it needs is installed."""
    import pytest

    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed ({hint})"
        if os.environ.get("CI"):
            pytest.fail(message + " and CI must run this test")
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_redis() -> str:
    """The Redis this test run writes to: ``BUILDQ_TEST_REDIS`` when set (the developer's choice),
    else a ``redis-server`` of the run's own on a free port, started here once and shut down when
    the process that started it exits. The tests never write to a Redis they did not start (the
    machine's 6379 is left alone); the URL is exported, so subprocesses share the same server."""
    given = os.environ.get("BUILDQ_TEST_REDIS")
    if given:
        return given.rstrip("/")
    port = free_port()
    folder = tempfile.mkdtemp(prefix=f"buildq-test-redis-{port}-")
    start_redis_server(port, "--save", "", "--appendonly", "no", "--dir", folder, "--databases", "32")
    url = f"redis://127.0.0.1:{port}"
    os.environ["BUILDQ_TEST_REDIS"] = url
    owner = os.getpid()

    def stop() -> None:
        if os.getpid() == owner:
            try:
                redis.Redis(port=port, socket_timeout=2).shutdown(nosave=True)
            except redis.RedisError:
                pass
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return url


REDIS_URL = _session_redis()

# the CLI's marks of validated settings (buildq/cli/quick.py) go to the suite's own cache folder,
# inherited by every buildq command the tests run, and removed at the end
_CACHE_HOME = tempfile.mkdtemp(prefix="buildq-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, True)


def base_env(db: int, queue: str, **extra: str) -> dict[str, str]:
    """BUILDQ_* variables for an isolated test namespace (own DBs, own queues)."""
    env = {
        "BUILDQ_BROKER_URL": f"{REDIS_URL}/{db}",
        "BUILDQ_RESULT_BACKEND": f"{REDIS_URL}/{db + 1}",
        "BUILDQ_LAUNCHER": "local",
        "BUILDQ_LOCAL_STATE_DIR": LOCAL_STATE_DIR,
        "BUILDQ_QUEUE": queue,
        "BUILDQ_HIGH_PRIORITY_QUEUE": queue + ".high",
        "BUILDQ_BUILDKIT_HOST": "tcp://127.0.0.1:1234",
        "BUILDQ_LEASE_TTL_S": "3",
        "BUILDQ_RETRY_BACKOFF_BASE_S": "0.05",
        "BUILDQ_RETRY_BACKOFF_CAP_S": "0.2",
        "BUILDQ_MAX_TIMEOUT_S": "600",
        "BUILDQ_DEFAULT_TIMEOUT_S": "300",
        "BUILDQ_VISIBILITY_TIMEOUT_S": "3600",
    }
    env.update(extra)
    return env


def simulated_deployment(
    standin: Path, db: int, daemons_dir: Path, hosts: str, **extra: str
) -> dict[str, str]:
    """A deployment (own DBs, flushed; own queue and local state) whose BuildKit daemons ``hosts``
    are the stand-in's simulated daemons in ``daemons_dir``."""
    env = base_env(
        db, f"t{uuid.uuid4().hex[:8]}", BUILDQ_BUILDCTL_PATH=str(standin), BUILDQ_BUILDKIT_HOSTS=hosts
    )
    env["STANDIN_DAEMONS_DIR"] = str(daemons_dir)
    env["BUILDQ_LOCAL_STATE_DIR"] = str(daemons_dir.parent / f"state-{db}")
    env.update(extra)
    flush_dbs(env)
    return env


def settings_from(env: Mapping[str, str]) -> Settings:
    return load_settings({k: v for k, v in env.items() if k.startswith("BUILDQ_")})


class WorkerProcess:
    """A ``buildq worker`` subprocess; ``stop()`` sends SIGTERM (warm shutdown) and waits."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        concurrency: int = 2,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
        log_dir: Path | None = None,
    ) -> None:
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        full_env = clean_environ("BUILDQ_", "STANDIN_")
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        self.log_path = (log_dir or Path("/tmp")) / f"buildq-{self.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        argv = [
            sys.executable,
            "-m",
            "buildq",
            "worker",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{self.name}@%h",
            "--loglevel",
            "INFO",
            *extra_args,
        ]
        self.proc = subprocess.Popen(
            argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def children(self) -> list[int]:
        """Pids of the prefork pool processes."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class StandinLog:
    """Reads the stand-in's per-invocation JSON lines (``STANDIN_LOG``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def ends(self) -> list[dict[str, Any]]:
        """Finished ``buildctl build`` runs (probes, ``debug workers``, are not builds)."""
        return [e for e in self.events() if e.get("event") == "end" and _is_build(e)]

    def starts(self) -> list[dict[str, Any]]:
        """Started ``buildctl build`` runs."""
        return [e for e in self.events() if e.get("event") == "start" and _is_build(e)]


def _is_build(event: dict[str, Any]) -> bool:
    return "debug" not in (event.get("argv") or [])


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def client_for(env: Mapping[str, str]) -> BuildqClient:
    return BuildqClient(settings_from(env))


def flush_dbs(env: Mapping[str, str]) -> None:
    for key in ("BUILDQ_BROKER_URL", "BUILDQ_RESULT_BACKEND"):
        redis.Redis.from_url(env[key]).flushdb()


class Background(threading.Thread):
    """Run a callable in a thread and keep its result or exception."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc


Errors = tuple[type[BaseException], ...]
#: what a producer retries while Redis restarts or Sentinel elects a new master
RETRYABLE: Errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def submit_retrying(
    client: BuildqClient,
    job: dict[str, Any],
    *,
    within_s: float = 60,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> str:
    """A producer that submits again while Redis is away (the job id makes it idempotent)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return str(client.submit(job).job_id)
        except retry_on:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_retrying(
    client: BuildqClient,
    job_id: str,
    timeout: float,
    *,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> dict[str, Any]:
    """Wait for a record, reconnecting while Redis is away."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dict(client.wait(job_id, timeout=max(1.0, deadline - time.monotonic())))
        except retry_on:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
