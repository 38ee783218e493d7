"""The job contract rejects bad input with the field named, and fills defaults."""

from __future__ import annotations

import json

import pytest

from buildq.contract.job import BuildJob, job_schema, parse_job
from buildq.contract.reference import parse_reference
from buildq.errors import InvalidJobError


def job(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"context": "/srv/ctx", "tags": ["registry:5000/team/app:1"]}
    base.update(over)
    return base


def test_defaults_filled_in() -> None:
    parsed = parse_job(job())
    assert parsed.dockerfile == "Dockerfile"
    assert parsed.push is True
    assert parsed.cache_mode == "max"
    assert parsed.cache_ref == "registry:5000/team/app:buildcache"
    assert len(parsed.job_id) == 32
    assert parse_job(job()).job_id != parsed.job_id


def test_cache_ref_default_uses_repository_of_first_tag() -> None:
    assert parse_job(job(tags=["alpine", "x/y:2"])).cache_ref == "alpine:buildcache"
    assert parse_job(job(tags=["localhost:5000/a/b:v1"])).cache_ref == "localhost:5000/a/b:buildcache"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"tags": ["Registry/UPPER:1"]}, "tags"),
        ({"tags": ["reg:5000/a:1,push=false"]}, "tags"),
        ({"tags": ["reg:5000/a:1", "reg/a:2\nx"]}, "tags"),
        ({"tags": ["reg/a=b:1"]}, "tags"),
        ({"tags": ["reg:5000/a@sha256:" + "a" * 64]}, "tags"),
        ({"tags": []}, "tags"),
        ({"tags": ["a:" + "t" * 129]}, "tags"),
        ({"cache_ref": "reg:5000/a:cache,mode=min"}, "cache_ref"),
        ({"cache_ref": "reg:5000/a:c\nb"}, "cache_ref"),
        ({"cache_ref": "reg:5000/a=b"}, "cache_ref"),
        ({"build_args": {"A,B": "1"}}, "build_args"),
        ({"build_args": {"A=B": "1"}}, "build_args"),
        ({"build_args": {"A": "line1\nline2"}}, "build_args"),
        ({"build_args": {"A": 1}}, "build_args.A"),
        ({"labels": {"a=b": "x"}}, "labels"),
        ({"nope": 1}, "nope"),
        ({"context": "relative/dir"}, "context"),
        ({"context": "ftp://host/repo.git"}, "context"),
        ({"context": "/srv/a,b"}, "context"),
        ({"dockerfile": "../Dockerfile"}, "dockerfile"),
        ({"dockerfile": "/abs/Dockerfile"}, "dockerfile"),
        ({"job_id": "-bad"}, "job_id"),
        ({"job_id": "a" * 129}, "job_id"),
        ({"platforms": ["linux"]}, "platforms"),
        ({"secrets": [{"id": "npm", "env": "NPM TOKEN"}]}, "secrets[0].env"),
        ({"secrets": [{"id": "npm", "env": "A", "value": "x"}]}, "secrets[0].value"),
        ({"cache_mode": "all"}, "cache_mode"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"push": "yes"}, "push"),
        ({"target": "a b"}, "target"),
    ],
)
def test_bad_input_names_the_field(over: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidJobError) as info:
        parse_job(job(**over))
    assert info.value.field == field
    assert field.split("[")[0].split(".")[0] in str(info.value)


def test_missing_context_is_named() -> None:
    with pytest.raises(InvalidJobError) as info:
        parse_job({"tags": ["a:1"]})
    assert info.value.field == "context"


def test_git_context_accepted() -> None:
    url = "https://github.com/moby/buildkit.git#v0.21.0:examples"
    assert parse_job(job(context=url)).is_git


def test_json_round_trip_and_schema() -> None:
    parsed = parse_job(job(build_args={"A": "x=y,z"}, secrets=[{"id": "npm", "env": "NPM_TOKEN"}]))
    again = parse_job(json.dumps(parsed.to_message()))
    assert again == parsed
    schema = job_schema()
    assert schema["required"] == ["context", "tags"]
    assert schema["additionalProperties"] is False
    assert "secrets" in schema["properties"]


def test_jobs_are_frozen() -> None:
    parsed = parse_job(job())
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError for frozen models
        parsed.push = False  # type: ignore[misc]
    assert isinstance(parsed, BuildJob)


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag"),
    [
        ("alpine", None, "alpine", None),
        ("library/alpine:3.20", None, "library/alpine", "3.20"),
        ("localhost/a", "localhost", "a", None),
        ("127.0.0.1:5000/demo/app:1", "127.0.0.1:5000", "demo/app", "1"),
        ("ghcr.io/org/my-app__x.y:v1.2_3", "ghcr.io", "org/my-app__x.y", "v1.2_3"),
        ("[::1]:5000/a:b", "[::1]:5000", "a", "b"),
    ],
)
def test_reference_grammar(text: str, domain: str | None, path: str, tag: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag) == (domain, path, tag)
    assert str(ref) == text


@pytest.mark.parametrize("text", ["", "Ab", "a//b", "a/b:", ":tag", "a/-b", "a/b:-x", "a:b:c", "a/b c"])
def test_reference_grammar_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_reference(text)
