"""Redis away, as producers and operators live it: workers that outlast a 45 s outage, and one clear
line with its own exit code from every command when Redis (or a registry) cannot be reached.

The Sentinel failover under 50 plain submits is in tests/test_sentinel.py.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import scenario
from tests.harness import StandinLog, base_env, client_for, free_port, require_tool, run_cli, wait_until


class OwnRedis:
    """A redis-server with an append-only file in ``folder``, stopped and started on one port."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        subprocess.run(
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--pidfile", str(self.folder / "redis.pid"), "--logfile", str(self.folder / "redis.log")],
            check=True,
        )  # fmt: skip
        wait_until(lambda: self._answers(), timeout=20)

    def stop(self) -> None:
        try:
            redis.Redis(port=self.port, socket_timeout=5).shutdown()  # the file is complete on disk
        except redis.exceptions.ConnectionError:
            pass  # the connection closes as it stops
        wait_until(lambda: not self._answers(), timeout=20)

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    require_tool("redis-server", "Debian: apt-get install redis-server; .ci/run installs it")
    server = OwnRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_workers_outlast_redis_stopped_for_45_seconds(
    own_redis: OwnRedis, standin: Path, context_dir: Path, tmp_path: Path, start_worker: Any
) -> None:
    log = StandinLog(tmp_path / "standin.jsonl")
    url = f"redis://127.0.0.1:{own_redis.port}"
    env = base_env(0, f"out{uuid.uuid4().hex[:6]}", BUILDQ_BUILDCTL_PATH=str(standin),
                   BUILDQ_LOCAL_STATE_DIR=str(tmp_path / "s"),
                   BUILDQ_REDIS_PERSISTENCE="require")  # fmt: skip
    env.update(BUILDQ_BROKER_URL=f"{url}/0", BUILDQ_RESULT_BACKEND=f"{url}/1", STANDIN_LOG=str(log.path))
    workers = [start_worker(env, concurrency=2, name=f"outage{i}") for i in range(2)]
    client = client_for(env)
    jobs = [
        client.submit({"context": str(context_dir), "tags": [f"reg/outage{i}:1"],
                       "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=3)}}).job_id
        for i in range(8)
    ]  # fmt: skip
    wait_until(lambda: len(log.starts()) >= 2, timeout=30)  # builds running, others queued
    own_redis.stop()
    time.sleep(45)  # the outage itself
    own_redis.start()
    records = [client.wait(j, timeout=180) for j in jobs]
    assert [r["state"] for r in records] == ["succeeded"] * 8, [r.get("error") for r in records]
    assert len(log.starts()) == 8  # nothing lost, nothing run twice
    assert all(w.proc.poll() is None for w in workers)  # both workers survived it
    said = sum(w.log().count("does not answer") for w in workers)
    assert said >= 1


# -- one line and its exit code, for every command --------------------------------------------

UNREACHABLE = {
    "BUILDQ_BROKER_URL": "redis://127.0.0.1:{port}/0",
    "BUILDQ_RESULT_BACKEND": "redis://127.0.0.1:{port}/1",
}


def unreachable_env() -> dict[str, str]:
    port = free_port()
    env = {k: v.format(port=port) for k, v in UNREACHABLE.items()}
    env["BUILDQ_REDIS_RETRY_S"] = "1"
    return env


@pytest.mark.parametrize(
    "args",
    [
        ("submit", "--context", "/srv", "--tag", "reg/app:1"),
        ("status", "0123456789abcdef"),
        ("list",),
        ("logs", "0123456789abcdef"),
        ("cancel", "0123456789abcdef"),
        ("retry", "0123456789abcdef"),
    ],
)
def test_redis_unreachable_is_one_line_and_exit_4(args: tuple[str, ...], tmp_path: Path) -> None:
    if args[0] == "submit":
        (tmp_path / "Dockerfile").write_text("FROM scratch\n")
        args = ("submit", "--context", str(tmp_path), "--tag", "reg/app:1")
    done = run_cli(unreachable_env(), *args)
    lines = done.stderr.splitlines()
    assert done.returncode == 4, done.stderr
    assert len(lines) == 1 and lines[0].startswith("buildq: cannot reach Redis at redis://127.0.0.1:"), lines
    assert lines[0].endswith("connection refused after 1 s") and "Traceback" not in done.stderr


def test_expected_errors_are_one_line_each(tmp_path: Path) -> None:
    from tests.harness import REDIS_URL

    env = base_env(21, "errs")
    cases = [
        (("submit", "--context", "/srv", "--tag", "Not A Tag"), 2, "invalid job: tags"),
        (("status", "never-seen-job"), 1, "unknown job 'never-seen-job'"),
        (("submit", "--job-file", "-"), 2, None),  # broken JSON on stdin
    ]
    for args, code, text in cases:
        done = run_cli(env, *args, stdin="{not json" if "--job-file" in args else None)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == code, (args, done.stderr)
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, lines)
        assert text is None or text in lines[0], (args, lines)
    # a registry that cannot be reached for an upload: one line, exit 1
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    up = {**env, "BUILDQ_CONTEXT_REPOSITORY": f"127.0.0.1:{free_port()}/contexts"}
    done = run_cli(up, "submit", "--upload", "--context", str(tmp_path), "--tag", "reg/app:1")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("buildq: upload failed"), lines
    assert REDIS_URL  # the test Redis answered throughout


def test_health_fails_naming_the_missing_workers() -> None:
    env = base_env(23, "hw", BUILDQ_LAUNCHER="local", BUILDQ_BUILDCTL_PATH="/bin/true")
    redis.Redis.from_url(env["BUILDQ_BROKER_URL"]).flushdb()
    done = run_cli(env, "health", "--json")
    report = json.loads(done.stdout)
    workers = [c for c in report["checks"] if c["name"] == "workers"]
    assert done.returncode == 1 and workers and not workers[0]["ok"]
    assert "no worker" in workers[0]["detail"]


def test_a_connection_lost_with_messages_delivered_does_not_end_the_worker(caplog) -> None:
    """kombu hands delivered messages back through the connection it is closing; when that
    connection is already torn down (a failover) it raised AttributeError and the worker died
    ("Unrecoverable error"). The worker now skips that hand-back with a warning."""
    from kombu import Connection

    from buildq.celeryapp.worker import survive_restore_on_a_lost_connection
    from tests.harness import REDIS_URL

    survive_restore_on_a_lost_connection()
    with Connection(f"{REDIS_URL}/14") as conn:
        channel = conn.default_channel
        channel.qos._delivered["delivered-tag"] = object()  # a build running in the pool
        channel._pool = None  # what a lost connection leaves behind
        transport, channel.connection.client = channel.connection.client, None
        try:
            with caplog.at_level("WARNING", logger="buildq.worker"):
                channel.qos.restore_unacked()  # raised AttributeError before
        finally:
            channel.connection.client = transport
            channel.qos._delivered.clear()
    assert "not handed back on a lost broker connection" in caplog.text


def test_the_patience_policy_retries_a_command_and_gives_a_reconnect_inside_it_one_try() -> None:
    """buildq's retry policy is redis-py's own loop with a budget in the backoff: a command is
    tried again until the budget, then one RedisUnavailable naming the Redis and the cause; a
    reconnect that redis-py makes inside a command's retry gets one try (the command's next try
    makes a new connection, through Sentinel to the master named now), never a loop of its own."""
    from buildq.errors import RedisUnavailable
    from buildq.store.connect import Patience

    policy = Patience(2.0, "redis://here:6379/0")
    tries: list[str] = []

    def reconnect() -> None:
        tries.append("reconnect")
        raise redis.exceptions.ConnectionError("Connection refused")

    def command() -> str:
        tries.append("command")
        if len(tries) < 4:
            policy.call_with_retry(reconnect, lambda error: None)  # inside the command's try
        return "answered"

    assert policy.call_with_retry(command, lambda error: None) == "answered"
    assert tries == ["command", "reconnect", "command", "reconnect", "command"]

    def refused() -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting. Connection refused.")

    said = r"cannot reach Redis at redis://here:6379/0: connection refused"
    with pytest.raises(RedisUnavailable, match=said):  # the budget ends the loop (retries: no limit)
        Patience(0.3, "redis://here:6379/0").call_with_retry(refused, lambda error: None)
