"""The compose stack's Flower answers its API: the ``flower`` service's command and environment,
as Compose renders them, run here as a real Flower process against the test run's Redis (the
container's image has the same ``buildq[flower]`` install as this environment); and the login
deploy/README.md documents is what Flower then asks for."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REDIS_URL, clean_environ, free_port, wait_until
from tests.test_compose import ROOT, run_compose

OVERRIDE = ROOT / "deploy" / "README.md"


def rendered_flower(*extra_files: Path) -> dict[str, Any]:
    args = [a for f in extra_files for a in ("-f", str(f))]
    proc = run_compose(*args, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    flower: dict[str, Any] = json.loads(proc.stdout)["services"]["flower"]
    return flower


def get(url: str, auth: str | None = None) -> int:
    """The HTTP status of a GET (0: nothing answers)."""
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


@pytest.fixture
def start_flower(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Starts the service's command (broker: this run's Redis, a free port) with its environment;
    returns Flower's base URL once it answers."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(service: dict[str, Any]) -> str:
        port = free_port()
        argv = [
            re.sub(r"^--broker=.*", f"--broker={REDIS_URL}/9", re.sub(r"^--port=\d+$", f"--port={port}", a))
            for a in service["command"]
        ]
        assert argv[0] == "celery" and f"--port={port}" in argv
        argv[0] = str(Path(sys.executable).parent / "celery")  # the image has it on its PATH
        env = {**clean_environ("BUILDQ_", "FLOWER_"), **service.get("environment", {})}
        log = open(tmp_path / f"flower-{port}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(f"{url}/healthcheck") == 200 or procs[-1].poll() is not None, timeout=60)
        assert procs[-1].poll() is None, (tmp_path / f"flower-{port}.log").read_text()
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def test_the_stacks_flower_answers_its_api_without_a_login(start_flower) -> None:
    url = start_flower(rendered_flower())
    assert get(f"{url}/api/tasks") == 200
    assert get(f"{url}/api/workers?refresh=false") == 200


def test_without_the_setting_flower_answers_401(start_flower) -> None:
    service = rendered_flower()
    service["environment"].pop("FLOWER_UNAUTHENTICATED_API")
    assert get(f"{start_flower(service)}/api/tasks") == 401  # what the issue saw


def test_the_documented_login_is_asked_for(start_flower, tmp_path: Path) -> None:
    (block,) = re.findall(r"```yaml\n(.*?)```", OVERRIDE.read_text().split("\n## Flower\n", 1)[1], re.S)
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(block)
    service = rendered_flower(override)
    (port,) = service["ports"]
    assert port.get("host_ip") is None and port["published"] == "5555"  # reachable from elsewhere now
    url = start_flower(service)
    user_password = service["environment"]["FLOWER_BASIC_AUTH"]
    assert get(f"{url}/api/tasks") == 401
    assert get(f"{url}/api/tasks", auth=user_password) == 200
    assert get(f"{url}/", auth="admin:wrong") == 401
