"""A Redis master, its replica and three Sentinels on free loopback ports, each its own
``redis-server`` process under a test's directory (stopped by their own pid files only)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.harness import free_port, wait_until

MASTER_NAME = "buildq"


class SentinelSetup:
    """``start()`` brings up master, replica and sentinels; ``kill_master()`` SIGKILLs the master."""

    def __init__(self, root: Path, *, down_after_ms: int = 1000) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.root = root
        self.down_after_ms = down_after_ms
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.pidfiles: list[Path] = []

    def _server(self, name: str, port: int, *options: str, conf: Path | None = None) -> None:
        workdir = self.root / name
        workdir.mkdir(parents=True, exist_ok=True)
        pidfile = workdir / "redis.pid"
        self.pidfiles.append(pidfile)
        subprocess.run(
            ["redis-server", *([str(conf)] if conf else []), "--daemonize", "yes", "--bind", "127.0.0.1",
             "--port", str(port), "--dir", str(workdir), "--pidfile", str(pidfile),
             "--logfile", str(workdir / "redis.log"), *options],
            check=True,
        )  # fmt: skip
        wait_until(lambda: _answers(port), timeout=10)

    def start(self) -> SentinelSetup:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelSetup:
        plain = ("--save", "", "--appendonly", "no")
        self._server("master", self.master_port, *plain, "--repl-diskless-sync-delay", "0")
        self._server("replica", self.replica_port, *plain, "--replicaof", "127.0.0.1", str(self.master_port))
        wait_until(lambda: self.replicas_of(self.master_port) == 1, timeout=20)
        for n, port in enumerate(self.sentinel_ports):
            conf = self.root / f"sentinel{n}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._server(f"sentinel{n}", port, "--sentinel", conf=conf)
        wait_until(lambda: self.master_addr() == ("127.0.0.1", self.master_port), timeout=10)
        # every sentinel knows the others and the replica before anything may fail
        wait_until(lambda: all(self._sentinel_sees_all(p) for p in self.sentinel_ports), timeout=20)
        return self

    def _sentinel_sees_all(self, port: int) -> bool:
        info = redis.Redis(port=port, socket_timeout=1).sentinel_master(MASTER_NAME)
        return int(info["num-other-sentinels"]) == 2 and int(info["num-slaves"]) == 1

    def url(self, db: int) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/{db}" for port in self.sentinel_ports)

    def master_addr(self) -> tuple[str, int] | None:
        for port in self.sentinel_ports:
            try:
                sentinel = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                host, master_port = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                return str(host), int(master_port)
            except (redis.RedisError, TypeError):
                continue
        return None

    @staticmethod
    def replicas_of(port: int) -> int:
        """Replicas of the Redis on ``port`` that finished their initial sync."""
        try:
            info = redis.Redis(port=port, socket_timeout=1).info("replication")
        except redis.RedisError:
            return -1
        return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                   and v.get("state") == "online")  # fmt: skip

    def wait_failover(self, since: float, timeout: float = 30.0) -> float:
        """Seconds from ``since`` (epoch) until the sentinels name the replica as the master."""
        wait_until(lambda: self.master_addr() == ("127.0.0.1", self.replica_port), timeout, interval=0.02)
        return time.time() - since

    def kill_master(self) -> None:
        os.kill(_pid(self.root / "master" / "redis.pid"), signal.SIGKILL)

    def stop(self) -> None:
        for pidfile in self.pidfiles:
            try:
                os.kill(_pid(pidfile), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def _pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 5
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(pidfile.read_text().strip())


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False
