"""The settings namespace: an unknown ``BUILDQ_*`` variable is named with the closest known one, on
one line, exit 2 from the CLI; ``BUILDQ_STACK_*`` (the compose stack's) and ``BUILDQ_TEST_*`` (the
test suite's) are not settings and are left alone."""

from __future__ import annotations

import pytest

from buildq.config import (
    ENV_PREFIX,
    NOT_SETTINGS_PREFIXES,
    STACK_VARIABLES,
    Settings,
    SettingsError,
    closest_name,
    load_settings,
)
from tests.harness import base_env, run_cli

KNOWN = sorted(ENV_PREFIX + name.upper() for name in Settings.model_fields)


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("BUILDQ_LAUNCHR", "BUILDQ_LAUNCHER"),
        ("BUILDQ_CONTEXT_ROOT", "BUILDQ_CONTEXT_ROOTS"),
        ("BUILDQ_BROKER", "BUILDQ_BROKER_URL"),
        ("BUILDQ_DOCKER_HOST", "BUILDQ_DOCKER_URL"),
        ("BUILDQ_FOO", None),  # the shared prefix does not make every name close
        ("BUILDQ_REGISTRY_PORT", "BUILDQ_STACK_REGISTRY_PORT"),
    ],
)
def test_the_closest_name_is_found_without_the_shared_prefix(name: str, closest: str | None) -> None:
    assert closest_name(name, [*KNOWN, *STACK_VARIABLES]) == closest


def test_an_unknown_setting_is_named_with_the_closest_known_one() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"BUILDQ_LAUNCHR": "local"})
    assert str(err.value) == (
        "unknown setting: BUILDQ_LAUNCHR (did you mean BUILDQ_LAUNCHER?); "
        "the settings are listed in docs/settings.md"
    )
    with pytest.raises(SettingsError) as err:
        load_settings({"BUILDQ_FOO": "1", "BUILDQ_CONTEXT_ROOT": "/srv"})
    assert str(err.value) == (
        "unknown settings: BUILDQ_CONTEXT_ROOT (did you mean BUILDQ_CONTEXT_ROOTS?), BUILDQ_FOO; "
        "the settings are listed in docs/settings.md"
    )


def test_the_old_compose_knob_points_to_the_stacks_own_variable() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"BUILDQ_REGISTRY_PORT": "5001"})
    hint = "(did you mean BUILDQ_STACK_REGISTRY_PORT? a variable of the compose stack, not a setting)"
    assert f"BUILDQ_REGISTRY_PORT {hint}" in str(err.value)


def test_the_stacks_and_the_test_suites_variables_are_not_settings() -> None:
    assert not [n for n in KNOWN if n.startswith(NOT_SETTINGS_PREFIXES)]
    assert all(v.startswith("BUILDQ_STACK_") for v in STACK_VARIABLES)
    env = {
        "BUILDQ_STACK_REGISTRY_PORT": "5001",
        "BUILDQ_STACK_ANYTHING": "x",
        "BUILDQ_TEST_REDIS": "redis://h",
    }
    assert load_settings(env) == load_settings({})


def test_the_cli_says_it_in_one_line_and_exits_2(buildq_env: dict[str, str]) -> None:
    out = run_cli({**buildq_env, "BUILDQ_REGISTRY_PORT": "5001"}, "status", "some-job")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "BUILDQ_REGISTRY_PORT" in out.stderr
    assert "did you mean BUILDQ_STACK_REGISTRY_PORT?" in out.stderr and "Traceback" not in out.stderr
    # exported for `docker compose up`, the stack's variable stops no buildq command
    fine = run_cli({**base_env(10, "q"), "BUILDQ_STACK_REGISTRY_PORT": "5001"}, "status", "some-job")
    assert fine.returncode == 1 and "unknown" in (fine.stdout + fine.stderr).lower()
