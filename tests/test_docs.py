"""The documentation says what the code does: the CLI's docstring and help, the pytest marker, the
README's settings names and test command (the record's shape is checked in test_record_schema)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from typer.main import get_command

import buildq.cli
from buildq.config import ENV_PREFIX, Settings, load_settings
from tests.harness import run_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_cli_docstring_names_every_command() -> None:
    commands = set(get_command(buildq.cli.app).commands)  # type: ignore[attr-defined]
    assert len(commands) == 9
    first_line = (buildq.cli.__doc__ or "").splitlines()[0]
    named = set(re.findall(r"[a-z]+", first_line.split(":", 1)[1]))
    assert commands <= named, commands - named


def test_the_docker_marker_points_to_the_script_that_starts_the_engine() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (marker,) = [m for m in config["tool"]["pytest"]["ini_options"]["markers"] if m.startswith("docker:")]
    scripts = re.findall(r"[\w./-]+\.sh\b", marker)
    assert scripts and all((ROOT / s).is_file() for s in scripts), marker


def test_the_readme_test_command_warns_of_the_root_docker_engine() -> None:
    intro = README.split("**Run the tests**", 1)[1].split("Contents:", 1)[0]
    assert ".ci/dockerd.sh" in intro and "as root" in intro and '-m "not docker"' in intro


def test_every_setting_the_readme_names_exists() -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    named = set(re.findall(r"`(BUILDQ_[A-Z0-9_]+)`", README))
    test_only = {"BUILDQ_TEST_BUILDKIT_BIN", "BUILDQ_TEST_REDIS"}  # the test suite's, not settings
    assert named - known - test_only == set()
    (row,) = [line for line in README.splitlines() if line.startswith("| `BUILDQ_BUILDKIT_HOSTS`")]
    assert "replaces `BUILDQ_BUILDKIT_HOST`" in row


def test_the_timeout_help_gives_the_workers_limit() -> None:
    limit = load_settings({}).max_timeout_s
    assert limit == 14400
    out = run_cli({}, "submit", "--help")
    assert "BUILDQ_MAX_TIMEOUT_S" in out.stdout and str(limit) in out.stdout
    assert f"`{limit}`" in README.split("`BUILDQ_DEFAULT_TIMEOUT_S` / `BUILDQ_MAX_TIMEOUT_S`", 1)[1][:40]


def test_every_cli_option_and_argument_has_help() -> None:
    for name, command in get_command(buildq.cli.app).commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            assert getattr(param, "help", None), f"buildq {name}: {param.name} has no help"
