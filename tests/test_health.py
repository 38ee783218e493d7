"""check_health against real Redis (DB 13), the buildctl stand-in and the local launcher."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import redis
from rich.console import Console

from buildq.cli.health import (
    Check,
    HealthReport,
    check_health,
    mask_url_passwords,
    render_health,
    url_passwords,
)
from buildq.config import Settings, SettingsError, load_settings
from buildq.launchers.base import BuildPaths, LaunchSpec, RunningBuild
from buildq.launchers.local import LocalLauncher
from tests.harness import REDIS_URL, free_port
from tests.standin import write_standin_executable

DB_URL = f"{REDIS_URL}/13"
GOOD = "tcp://127.0.0.1:1234"
REFUSED = "tcp://127.0.0.1:1"
REFUSED_SCENARIO = json.dumps({"kind": "refused"})


class ScenarioLauncher(LocalLauncher):
    """The local launcher, plus a stand-in scenario chosen by the daemon address (BUILDKIT_HOST)."""

    def __init__(self, path: str, scenarios: Mapping[str, str], state_dir: str) -> None:
        super().__init__(path, state_dir=state_dir)
        self.scenarios = dict(scenarios)
        self.specs: list[LaunchSpec] = []

    def start(self, spec: LaunchSpec, paths: BuildPaths) -> RunningBuild:
        self.specs.append(spec)
        scenario = self.scenarios.get(spec.env.get("BUILDKIT_HOST", ""))
        if scenario:
            spec = spec._replace(env={**spec.env, "STANDIN_SCENARIO": scenario})
        return super().start(spec, paths)


@pytest.fixture(autouse=True)
def _db13() -> Iterator[None]:
    r = redis.Redis.from_url(DB_URL)
    r.flushdb()
    yield
    r.flushdb()
    r.close()


@pytest.fixture
def standin_path(tmp_path: Path) -> str:
    return str(write_standin_executable(tmp_path / "bin"))


@pytest.fixture
def launcher(standin_path: str, tmp_path: Path) -> ScenarioLauncher:
    return ScenarioLauncher(standin_path, {REFUSED: REFUSED_SCENARIO}, str(tmp_path / "state"))


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"broker_url": DB_URL, "result_backend": DB_URL, "launcher": "local"}
    values.update(overrides)
    return load_settings({}, **values)


def by_name(report: HealthReport) -> dict[str, Check]:
    """The checks by name, but the workers' (tested on its own below)."""
    return {check.name: check for check in report.checks if check.name != "workers"}


def names(report: HealthReport) -> list[str]:
    return list(by_name(report))


@pytest.fixture(autouse=True)
def a_live_worker() -> Any:
    """One worker's heartbeat in the test's Redis (health needs one alive to be ok)."""
    import redis

    from buildq.store.jobs import JobStore

    client = redis.Redis.from_url(DB_URL)
    JobStore(client, result_ttl_s=60).heartbeat(worker="w1@test", domain="test", ttl_s=60)
    yield
    client.delete("buildq:workers", "buildq:domains", "buildq:epoch")
    client.close()


def test_health_names_the_live_workers_and_fails_without_one(launcher: ScenarioLauncher) -> None:
    import redis

    report = check_health(settings(buildkit_host=GOOD), launcher=launcher)
    (workers,) = [c for c in report.checks if c.name == "workers"]
    assert workers.ok and workers.detail == "1 alive: w1@test"
    redis.Redis.from_url(DB_URL).delete("buildq:workers")
    report = check_health(settings(buildkit_host=GOOD), launcher=launcher)
    (workers,) = [c for c in report.checks if c.name == "workers"]
    assert not workers.ok and "no worker" in workers.detail and not report.ok


def rendered(report: HealthReport) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_health(report))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_good_and_refused_daemons(launcher: ScenarioLauncher) -> None:
    report = check_health(settings(buildkit_hosts=[GOOD, REFUSED]), launcher=launcher)
    checks = by_name(report)
    assert list(checks) == ["broker", f"buildkit {GOOD}", f"buildkit {REFUSED}"]
    assert checks["broker"].ok
    assert checks["broker"].detail == f"PING answered by {DB_URL}"
    assert checks[f"buildkit {GOOD}"].ok
    bad = checks[f"buildkit {REFUSED}"]
    assert not bad.ok
    assert bad.detail.startswith("exit 1: failed to list workers: Unavailable: connection error")
    assert "dial tcp 127.0.0.1:1: connect: connection refused" in bad.detail
    assert not report.ok
    # each daemon got its own health job running `debug workers` with only BUILDKIT_HOST set
    assert sorted((s.job_id, s.argv[0], s.argv[1], dict(s.env)["BUILDKIT_HOST"]) for s in launcher.specs) == [
        ("health-0", "debug", "workers", GOOD),
        ("health-1", "debug", "workers", REFUSED),
    ]
    assert launcher.find_orphans() == []  # pid files removed: every buildctl was reaped


def test_all_ok(launcher: ScenarioLauncher) -> None:
    report = check_health(settings(buildkit_hosts=[GOOD, "tcp://127.0.0.1:1235"]), launcher=launcher)
    assert report.ok
    assert names(report) == ["broker", f"buildkit {GOOD}", "buildkit tcp://127.0.0.1:1235"]
    assert all(c.seconds >= 0 for c in report.checks)


def test_single_host_setting_used(launcher: ScenarioLauncher) -> None:
    report = check_health(settings(buildkit_host=REFUSED), launcher=launcher)
    checks = [(c.name, c.ok) for c in report.checks if c.name != "workers"]
    assert checks == [("broker", True), (f"buildkit {REFUSED}", False)]


def test_broker_down(launcher: ScenarioLauncher) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    report = check_health(
        settings(broker_url=down, result_backend=DB_URL, buildkit_host=GOOD), launcher=launcher
    )
    checks = by_name(report)
    assert not checks["broker"].ok
    assert checks["broker"].detail.startswith(f"{down}: ConnectionError")
    assert "refused" in checks["broker"].detail.lower()
    assert checks["result backend"].ok  # a different Redis URL is checked separately
    assert checks[f"buildkit {GOOD}"].ok
    assert not report.ok


def test_state_redis_checked_when_spelled_apart(launcher: ScenarioLauncher) -> None:
    # BUILDQ_REDIS_URL must name the broker's Redis and DB; spelled another way, it is checked too
    other = f"{DB_URL}?socket_timeout=5"
    report = check_health(settings(redis_url=other, buildkit_host=GOOD), launcher=launcher)
    assert names(report) == ["broker", "state redis", f"buildkit {GOOD}"]
    assert report.ok
    with pytest.raises(SettingsError, match="BUILDQ_REDIS_URL must name the broker's Redis and DB"):
        settings(redis_url=f"{REDIS_URL}/12")


def test_non_redis_backend_not_checked(launcher: ScenarioLauncher) -> None:
    report = check_health(settings(result_backend="db+sqlite:///r.db", buildkit_host=GOOD), launcher=launcher)
    backend = by_name(report)["result backend"]
    assert backend.ok and backend.detail == "not checked: db+sqlite is not a Redis URL"


def test_passwords_masked(launcher: ScenarioLauncher) -> None:
    port = free_port()
    broker = f"redis://:s3cr%40tpw@127.0.0.1:{port}/0"
    backend = f"redis://alice:hunter22@127.0.0.1:{port}/1"
    report = check_health(
        settings(broker_url=broker, result_backend=backend, buildkit_host=GOOD), launcher=launcher
    )
    checks = by_name(report)
    assert checks["broker"].detail.startswith(f"redis://:***@127.0.0.1:{port}/0: ")
    assert checks["result backend"].detail.startswith(f"redis://alice:***@127.0.0.1:{port}/1: ")
    text = rendered(report) + repr(report)
    for secret in ("s3cr%40tpw", "s3cr@tpw", "hunter22"):
        assert secret not in text


def test_mask_url_passwords() -> None:
    assert mask_url_passwords("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url_passwords("x rediss://u:p%40ss@h/1 y") == "x rediss://u:***@h/1 y"
    assert mask_url_passwords("redis://h:6379/0?password=pw&db=1") == "redis://h:6379/0?password=***&db=1"
    assert mask_url_passwords("redis://host:6379/0 tcp://h:1234") == "redis://host:6379/0 tcp://h:1234"
    assert mask_url_passwords("redis://user@host") == "redis://user@host"
    assert url_passwords(["redis://:a%2Fb@h", None, "redis://h?password=zz"]) == ["a%2Fb", "a/b", "zz", "zz"]


def test_hanging_daemon_is_killed(tmp_path: Path) -> None:
    hang = tmp_path / "hang" / "buildctl"
    hang.parent.mkdir()
    hang.write_text(
        f"#!{sys.executable} -S\n"
        "import sys, time\nprint('dialing', file=sys.stderr, flush=True)\ntime.sleep(120)\n"
    )
    hang.chmod(0o755)
    launcher = LocalLauncher(str(hang), state_dir=str(tmp_path / "state"))
    report = check_health(settings(buildkit_host=GOOD), launcher=launcher, timeout_s=0.5)
    daemon = by_name(report)[f"buildkit {GOOD}"]
    assert not daemon.ok
    assert daemon.detail == "no answer within 0.5s (buildctl killed)"
    assert launcher.find_orphans() == []


def test_missing_buildctl(tmp_path: Path) -> None:
    launcher = LocalLauncher(str(tmp_path / "nope" / "buildctl"), state_dir=str(tmp_path / "state"))
    daemon = by_name(check_health(settings(buildkit_host=GOOD), launcher=launcher))[f"buildkit {GOOD}"]
    assert not daemon.ok
    assert daemon.detail.startswith("cannot start buildctl: PermanentBuildError: cannot run buildctl at")


def test_docker_engine_down_skips_daemons(launcher: ScenarioLauncher) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    report = check_health(settings(launcher="docker", docker_url=url, buildkit_host=GOOD), launcher=launcher)
    checks = by_name(report)
    assert list(checks) == ["broker", "docker engine", f"buildkit {GOOD}"]
    assert not checks["docker engine"].ok
    assert checks["docker engine"].detail.startswith(f"{url}: DockerException")
    assert checks[f"buildkit {GOOD}"].detail == "not checked: docker engine not ok"
    assert launcher.specs == []


class FakeDocker:
    def __init__(self, images: set[str]) -> None:
        self.present = images
        self.closed = False
        self.images = self

    def ping(self) -> bool:
        return True

    def get(self, name: str) -> object:
        if name not in self.present:
            raise docker.errors.ImageNotFound(f"No such image: {name}")
        return object()

    def close(self) -> None:
        self.closed = True


def test_docker_engine_and_image(launcher: ScenarioLauncher) -> None:
    fake = FakeDocker({"moby/buildkit:v0.21.0"})
    report = check_health(
        settings(launcher="docker", buildkit_host=GOOD), launcher=launcher, docker_factory=lambda s, t: fake
    )
    checks = by_name(report)
    assert names(report) == ["broker", "docker engine", "docker image", f"buildkit {GOOD}"]
    assert checks["docker image"].detail == "moby/buildkit:v0.21.0 present"
    assert report.ok and fake.closed


def test_docker_image_absent(launcher: ScenarioLauncher) -> None:
    report = check_health(
        settings(launcher="docker", buildkit_host=GOOD),
        launcher=launcher,
        docker_factory=lambda s, t: FakeDocker(set()),
    )
    checks = by_name(report)
    assert checks["docker engine"].ok
    assert not checks["docker image"].ok
    assert checks["docker image"].detail.startswith("moby/buildkit:v0.21.0 absent locally")
    assert checks[f"buildkit {GOOD}"].detail == "not checked: docker image not ok"


def test_render_health_columns_and_rows() -> None:
    report = HealthReport(
        (
            Check("broker", True, "PING answered by redis://h/0", 0.0123),
            Check("buildkit [x]", False, "exit 1: [bold]not markup[/bold]", 0.5),
        )
    )
    table = render_health(report)
    assert [str(c.header) for c in table.columns] == ["check", "status", "detail", "time"]
    assert table.row_count == 2
    out = rendered(report)
    assert "buildq health: FAILING" in out
    assert "[bold]not markup[/bold]" in out and "buildkit [x]" in out
    assert "12 ms" in out and "500 ms" in out and "FAIL" in out


def test_render_health_reads_in_80_columns() -> None:
    detail = (
        "exit 1: error: listing workers for Build: failed to list workers: Unavailable: connection error: "
        'desc = "transport: Error while dialing: dial tcp 10.20.30.40:1234: connect: connection refused"'
    )
    report = HealthReport(
        (Check("buildkit tcp://buildkitd-long-hostname.example.internal:1234", False, detail, 0.5),)
    )
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(render_health(report))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "connection refused" in out and "500 ms" in out
    folded = "".join(line.strip() for line in out.splitlines())
    assert "buildkitd-long-hostname" in folded
