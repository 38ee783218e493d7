"""What the operator grants producers (secrets, context roots, repositories): the pure rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildq.config import SettingsError, load_settings
from buildq.contract.grants import (
    check_context_roots,
    check_producer_grants,
    check_repositories,
    check_secrets,
    context_outside_roots,
    granted_values,
    normalize_repository,
    repository_matches,
    repository_of,
    secret_granted,
    validate_repository_pattern,
)
from buildq.contract.job import parse_job
from buildq.contract.reference import parse_reference
from buildq.engine.lifecycle import check_job_on_worker
from buildq.errors import InvalidJobError


def job(**fields):
    return parse_job({"context": "/srv/builds/app", "tags": ["registry:5000/team-a/app:1"], **fields})


# -- secrets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "patterns", "granted"),
    [
        ("NPM_TOKEN", [], False),  # unset: nothing is granted
        ("NPM_TOKEN", ["NPM_TOKEN"], True),
        ("NPM_TOKEN_2", ["NPM_TOKEN"], False),
        ("BUILD_SECRET_NPM", ["BUILD_SECRET_*"], True),
        ("BUILD_SECRET_", ["BUILD_SECRET_*"], True),
        ("WORKER_CLOUD_TOKEN", ["BUILD_SECRET_*"], False),
        ("build_secret_npm", ["BUILD_SECRET_*"], False),  # case matters, as in the environment
        ("TOKEN_A", ["OTHER", "TOKEN_?"], True),
        ("BUILDQ_BROKER_URL", ["*"], False),  # the worker's own settings: never
        ("BUILDQ_BROKER_URL", ["BUILDQ_BROKER_URL"], False),
    ],
)
def test_secret_granted(name, patterns, granted) -> None:
    assert secret_granted(name, patterns) is granted


def test_granted_values_are_every_matching_variable_but_empty_ones() -> None:
    environ = {"BUILD_SECRET_A": "aaaa", "BUILD_SECRET_B": "bbbb", "BUILD_SECRET_C": "", "HOME": "/root"}
    assert sorted(granted_values(environ, ["BUILD_SECRET_*"])) == ["aaaa", "bbbb"]
    assert granted_values(environ, []) == []


def test_an_ungranted_secret_names_the_field() -> None:
    secrets = [{"id": "npm", "env": "BUILD_SECRET_NPM"}, {"id": "x", "env": "WORKER_CLOUD_TOKEN"}]
    with pytest.raises(InvalidJobError) as info:
        check_secrets(job(secrets=secrets), ["BUILD_SECRET_*"])
    assert info.value.field == "secrets[1].env"
    assert "WORKER_CLOUD_TOKEN" in info.value.message and "BUILDQ_SECRET_ENV" in info.value.message
    with pytest.raises(InvalidJobError) as info:
        check_secrets(job(secrets=secrets), [])
    assert info.value.field == "secrets[0].env" and "not set" in info.value.message
    check_secrets(job(secrets=secrets[:1]), ["BUILD_SECRET_*"])
    check_secrets(job(), [])  # no secrets: nothing to grant


# -- repositories ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repository", "normal"),
    [
        ("alpine", "docker.io/library/alpine"),
        ("team/app", "docker.io/team/app"),
        ("docker.io/alpine", "docker.io/library/alpine"),
        ("index.docker.io/team/app", "docker.io/team/app"),
        ("registry:5000/team/app", "registry:5000/team/app"),
        ("localhost/app", "localhost/app"),
        ("ghcr.io/org/app", "ghcr.io/org/app"),
        ("team-*/app", "docker.io/team-*/app"),  # a pattern: * does not make a registry host
    ],
)
def test_docker_hub_names_are_spelled_out(repository, normal) -> None:
    assert normalize_repository(repository) == normal


@pytest.mark.parametrize(
    ("repository", "pattern", "matches"),
    [
        ("registry:5000/team-a/app", "registry:5000/team-a/*", True),
        ("registry:5000/team-a/sub/app", "registry:5000/team-a/*", True),  # a final /* is a subtree
        ("registry:5000/team-a", "registry:5000/team-a/*", False),
        ("registry:5000/team-ab/app", "registry:5000/team-a/*", False),
        ("registry:5000/team-b/app", "registry:5000/team-a/*", False),
        ("registry:5001/team-a/app", "registry:5000/team-a/*", False),
        ("registry:5000/team-a/app", "registry:5000/team-a/app", True),  # no wildcard: only itself
        ("registry:5000/team-a/app/x", "registry:5000/team-a/app", False),
        ("registry:5000/team-a/app-web", "registry:5000/team-a/app-*", True),
        ("registry:5000/team-a/app-web/x", "registry:5000/team-a/app-*", False),  # * stops at /
        ("registry:5000/x/app", "registry:5000/*/app", True),
        ("registry:5000/x/y/app", "registry:5000/*/app", False),
        ("registry:5000/team-a/app", "registry:5000/*", True),
        ("eu.registry.corp/team-a/app", "*.registry.corp/team-a/*", True),
        ("alpine", "docker.io/library/alpine", True),
        ("docker.io/library/alpine", "alpine", True),
        ("team-a/app", "docker.io/team-a/*", True),
        ("index.docker.io/team-a/app", "team-a/*", True),
        ("team-b/app", "team-a/*", False),
        ("registry:5000/team-a/app", "team-a/*", False),  # another registry
        ("registry:5000.evil/team-a/app", "registry:5000/team-a/*", False),  # dots are literal
    ],
)
def test_repository_patterns(repository, pattern, matches) -> None:
    assert repository_matches(repository, validate_repository_pattern(pattern)) is matches


@pytest.mark.parametrize(
    "reference",
    ["alpine", "alpine:3", "team/app:1", "registry:5000/team/app", "registry:5000/team/app:v1.2",
     "localhost:5000/a", "[::1]:5000/a/b:latest", "index.docker.io/x/y:z"],
)  # fmt: skip
def test_repository_of_drops_the_tag_as_the_reference_grammar_does(reference) -> None:
    assert repository_of(reference) == parse_reference(reference).repository


@pytest.mark.parametrize(
    "pattern",
    ["", "registry:5000/team-a/app:1", "registry:5000/Team/*", "reg/a b", "reg/app@sha256:" + "a" * 64],
)
def test_bad_repository_patterns_are_refused(pattern) -> None:
    with pytest.raises(ValueError):
        validate_repository_pattern(pattern)


def test_tags_and_cache_ref_outside_the_allowed_repositories_name_the_field() -> None:
    allowed = ["registry:5000/team-a/*"]
    check_repositories(job(), allowed)  # the default cache ref is in the first tag's repository
    check_repositories(job(tags=["registry:5000/team-b/app:1"]), [])  # unset: anything
    with pytest.raises(InvalidJobError) as info:
        check_repositories(job(tags=["registry:5000/team-a/app:1", "registry:5000/team-b/app:1"]), allowed)
    assert info.value.field == "tags[1]"
    assert "registry:5000/team-b/app" in info.value.message
    assert "BUILDQ_ALLOWED_REPOSITORIES" in info.value.message
    with pytest.raises(InvalidJobError) as info:
        check_repositories(job(cache_ref="registry:5000/team-b/app:buildcache"), allowed)
    assert info.value.field == "cache_ref"


def test_a_producer_checks_what_it_knows() -> None:
    with pytest.raises(InvalidJobError) as info:
        check_producer_grants(job(tags=["reg/b:1"]), secret_env=[], allowed_repositories=["reg/a"])
    assert info.value.field == "tags[0]"
    secret = job(secrets=[{"id": "x", "env": "WORKER_CLOUD_TOKEN"}])
    with pytest.raises(InvalidJobError) as info:
        check_producer_grants(secret, secret_env=["BUILD_SECRET_*"], allowed_repositories=[])
    assert info.value.field == "secrets[0].env"
    # without BUILDQ_SECRET_ENV the producer does not know the grants: the worker decides
    check_producer_grants(secret, secret_env=[], allowed_repositories=[])


# -- context roots ---------------------------------------------------------------------------------

ROOTS = ["/srv/builds"]


@pytest.mark.parametrize(
    ("context", "real_context", "refused"),
    [
        ("/srv/builds/app", "/srv/builds/app", None),
        ("/srv/builds", "/srv/builds", None),
        ("/srv/builds/a/b/c", "/srv/builds/a/b/c", None),
        ("/srv/builds/app", "/srv/builds/other", None),  # a symlink that stays inside
        ("/etc", "/etc", "outside"),
        ("/srv/builds2/app", "/srv/builds2/app", "outside"),  # a prefix is not a parent
        ("/srv/builds/evil", "/home/worker/.aws", "symlink"),  # escapes through a symlink
        ("/tmp/link", "/srv/builds/app", "outside"),  # written outside: refused as written
    ],
)
def test_context_roots(context, real_context, refused) -> None:
    why = context_outside_roots(context, real_context, ROOTS, ROOTS)
    if refused is None:
        assert why is None
    else:
        assert why is not None and why.startswith("context: ") and refused in why
        assert "BUILDQ_CONTEXT_ROOTS" in why
        assert real_context not in why or real_context == context  # the target is not revealed


def test_roots_are_resolved_too() -> None:
    real = {"/srv/builds": "/data/builds", "/srv/builds/app": "/data/builds/app", "/srv/builds/x": "/etc"}
    check_context_roots("/srv/builds/app", ROOTS, realpath=real.__getitem__)
    with pytest.raises(InvalidJobError) as info:
        check_context_roots("/srv/builds/x", ROOTS, realpath=real.__getitem__)
    assert info.value.field == "context"
    check_context_roots("/anything", [], realpath=real.__getitem__)  # unset: anywhere


def test_a_symlink_escaping_the_root_on_disk(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "app").mkdir(parents=True)
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    (root / "inner").symlink_to(root / "app")
    check_context_roots(str(root / "app"), [str(root)])
    check_context_roots(str(root / "inner"), [str(root)])
    with pytest.raises(InvalidJobError) as info:
        check_context_roots(str(root / "evil"), [str(root)])
    assert info.value.field == "context" and "symlink" in info.value.message
    with pytest.raises(InvalidJobError):
        check_context_roots(str(root / "evil" / "sub"), [str(root)])


# -- on the worker: grants first, so a refusal reveals nothing of the worker -----------------------


def worker_check(j, **grants) -> None:
    kwargs = {"secret_env": [], "context_roots": [], "allowed_repositories": [], **grants}
    kwargs["real_context_roots"] = [os.path.realpath(root) for root in kwargs["context_roots"]]
    check_job_on_worker(j, environ={"SET": "value"}, max_timeout_s=600, **kwargs)


def test_worker_refuses_before_looking_at_files_or_variables(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(InvalidJobError) as info:
        worker_check(job(context=missing), context_roots=["/srv/builds"])
    assert info.value.field == "context" and "BUILDQ_CONTEXT_ROOTS" in info.value.message
    with pytest.raises(InvalidJobError) as info:  # an ungranted variable: not whether it is set
        worker_check(job(context=missing, secrets=[{"id": "x", "env": "UNSET"}]))
    assert info.value.field == "secrets[0].env" and "BUILDQ_SECRET_ENV" in info.value.message
    with pytest.raises(InvalidJobError) as info:
        worker_check(job(context=missing), allowed_repositories=["reg/other"])
    assert info.value.field == "tags[0]"
    with pytest.raises(InvalidJobError) as info:  # granted but unset on the worker
        worker_check(job(context=missing, secrets=[{"id": "x", "env": "UNSET"}]), secret_env=["UNSET"])
    assert info.value.field == "context"


def test_worker_accepts_what_was_granted(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")
    granted = job(context=str(tmp_path / "app"), secrets=[{"id": "x", "env": "SET"}])
    worker_check(
        granted, secret_env=["SET"], context_roots=[str(tmp_path)], allowed_repositories=["registry:5000/*"]
    )


# -- settings --------------------------------------------------------------------------------------


def test_settings_read_the_grants() -> None:
    settings = load_settings(
        {
            "BUILDQ_SECRET_ENV": "BUILD_SECRET_*, NPM_TOKEN",
            "BUILDQ_CONTEXT_ROOTS": "/srv/builds/,/data//ci",
            "BUILDQ_ALLOWED_REPOSITORIES": "registry:5000/team-a/*,team-a/app",
        }
    )
    assert settings.secret_env == ["BUILD_SECRET_*", "NPM_TOKEN"]
    assert settings.context_roots == ["/srv/builds", "/data/ci"]
    assert settings.allowed_repositories == ["registry:5000/team-a/*", "team-a/app"]
    unset = load_settings({})
    assert (unset.secret_env, unset.context_roots, unset.allowed_repositories) == ([], [], [])


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BUILDQ_CONTEXT_ROOTS", "srv/builds"),
        ("BUILDQ_ALLOWED_REPOSITORIES", "registry:5000/team-a/app:1"),
        ("BUILDQ_SECRET_ENV", "NPM TOKEN"),
    ],
)
def test_bad_grants_name_the_variable(variable, value) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({variable: value})
    assert variable in str(info.value)


def test_the_context_check_resolves_the_real_filesystem(tmp_path: Path) -> None:
    """The default ``realpath`` is the operating system's."""
    (tmp_path / "r").mkdir()
    os.symlink("/", tmp_path / "r" / "slash")
    with pytest.raises(InvalidJobError):
        check_context_roots(str(tmp_path / "r" / "slash"), [str(tmp_path / "r")])


def test_worker_missing_directory_points_a_remote_producer_to_upload(tmp_path: Path) -> None:
    with pytest.raises(InvalidJobError) as info:
        worker_check(job(context=str(tmp_path / "missing")))
    assert info.value.field == "context" and "buildq submit --upload" in info.value.message


def test_worker_reads_nothing_for_url_contexts_even_with_roots() -> None:
    url = "http://registry:5000/v2/buildq/contexts/blobs/sha256:" + "a" * 64
    worker_check(job(context=url), context_roots=["/srv/builds"])  # no directory, no roots: accepted
