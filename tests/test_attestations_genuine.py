"""Multi-platform images and attestations on genuine buildctl/buildkitd v0.21.0 (opt-in: ``buildkit``).

Through the queue, a real worker and a real registry (tests/genuine.py): a two-platform ``FROM
scratch`` build whose record names the registry's two manifest digests; ``provenance: max`` with a
granted secret used by a RUN step and a build arg, from a context uploaded as a registry blob (so
the statement holds a context URL): the pushed statement names the image digest, holds no granted
secret value and no URL query string; an SBOM made by a scanner image built here (BuildKit's scanner
protocol; no pulls) pushed as an SPDX attestation.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.capture_attestations import scanner_image
from tests.genuine import Daemon, Registry, bin_dir, busybox_base
from tests.harness import base_env, client_for, flush_dbs, run_cli

pytestmark = [
    pytest.mark.buildkit,
    pytest.mark.skipif(bin_dir() is None, reason="BUILDQ_TEST_BUILDKIT_BIN is not set (genuine BuildKit)"),
]

SECRET = f"granted-{uuid.uuid4().hex}"
TWO = ["linux/amd64", "linux/arm64"]


@pytest.fixture
def genuine(tmp_path: Path) -> Iterator[dict[str, Any]]:
    bins = bin_dir()
    assert bins is not None
    registry = Registry(tmp_path / "registry")
    daemon = Daemon(bins, tmp_path / "buildkitd", registry)
    try:
        base = busybox_base(bins, daemon, registry, tmp_path)
        scanner = scanner_image(bins, daemon, registry, base, tmp_path)
        yield {"bins": bins, "registry": registry, "daemon": daemon, "base": base, "scanner": scanner}
    finally:
        daemon.stop()
        registry.stop()


def deployment(genuine: dict[str, Any], tmp_path: Path, db: int, **extra: str) -> dict[str, str]:
    host = genuine["registry"].host
    env = base_env(
        db, f"a{uuid.uuid4().hex[:8]}",
        BUILDQ_BUILDCTL_PATH=str(genuine["bins"] / "buildctl"), BUILDQ_BUILDKIT_HOST=genuine["daemon"].addr,
        BUILDQ_INSECURE_REGISTRIES=host, BUILDQ_LOCAL_STATE_DIR=str(tmp_path / "state"),
        BUILDQ_SBOM_SCANNER_IMAGE=genuine["scanner"], **extra,
    )  # fmt: skip
    flush_dbs(env)
    return env


def get(host: str, repo: str, what: str, ref: str) -> bytes:
    accept = (
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json, "
        "application/vnd.docker.distribution.manifest.v2+json"
    )
    request = urllib.request.Request(f"http://{host}/v2/{repo}/{what}/{ref}", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def index_of(host: str, repo: str, tag: str) -> dict[str, Any]:
    return json.loads(get(host, repo, "manifests", tag))


def statements(host: str, repo: str, attestation: dict[str, Any]) -> list[str]:
    """The in-toto statements of an attestation manifest, as the registry serves them."""
    manifest = json.loads(get(host, repo, "manifests", attestation["digest"]))
    return [get(host, repo, "blobs", layer["digest"]).decode() for layer in manifest["layers"]]


def scratch_context(tmp_path: Path) -> Path:
    ctx = tmp_path / "scratch"
    ctx.mkdir()
    (ctx / "app.txt").write_text("hello from buildq\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY app.txt /app.txt\n")
    return ctx


def test_a_two_platform_build_records_the_registrys_manifests(genuine, tmp_path, start_worker) -> None:
    env = deployment(genuine, tmp_path, 2)
    start_worker(env, concurrency=1)
    host = genuine["registry"].host
    handle = client_for(env).submit(
        {"context": str(scratch_context(tmp_path)), "tags": [f"{host}/demo/multi:1"], "platforms": TWO}
    )
    record = handle.wait(timeout=180)
    assert record["state"] == "succeeded", record["error"]
    index = index_of(host, "demo/multi", "1")
    held = {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"] for m in index["manifests"]}
    assert record["image"]["platforms"] == held and sorted(held) == TWO
    assert record["image"]["digest"].startswith("sha256:") and record["image"]["attestations"] == []
    shown = run_cli(env, "status", handle.job_id)
    assert all(digest in shown.stdout for digest in held.values()), shown.stdout
    print(f"\ngenuine two-platform index {record['image']['digest']}: {json.dumps(held)}")


def test_provenance_max_names_the_image_and_holds_no_secret_and_no_query(
    genuine, tmp_path, start_worker
) -> None:
    host = genuine["registry"].host
    env = deployment(
        genuine,
        tmp_path,
        4,
        BUILDQ_SECRET_ENV="ATTEST_TOKEN",
        BUILDQ_CONTEXT_REPOSITORY=f"{host}/buildq/contexts",
    )
    env["ATTEST_TOKEN"] = SECRET
    start_worker(env, concurrency=1)
    ctx = tmp_path / "prov"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {genuine['base']}\nARG GREETING\n"
        "RUN --mount=type=secret,id=token "
        'test "$(cat /run/secrets/token)" != "" && echo "$GREETING" > /greeting\n'
    )
    handle = client_for(env).submit(
        {
            "context": str(ctx), "tags": [f"{host}/demo/prov:1"], "provenance": "max",
            "build_args": {"GREETING": "hi"}, "secrets": [{"id": "token", "env": "ATTEST_TOKEN"}],
        },
        upload=True,
    )  # fmt: skip
    record = handle.wait(timeout=180)
    assert record["state"] == "succeeded", record["error"]
    image = record["image"]
    (attestation,) = image["attestations"]
    assert attestation["predicate_types"] == ["https://slsa.dev/provenance/v0.2"]
    assert attestation["subject"] == image["platforms"]["linux/amd64"]
    (text,) = statements(host, "demo/prov", attestation)
    statement = json.loads(text)
    assert statement["subject"][0]["digest"]["sha256"] == attestation["subject"].removeprefix("sha256:")
    assert statement["predicate"]["invocation"]["parameters"]["args"] == {"build-arg:GREETING": "hi"}
    uris = re.findall(r'"uri":\s*"([^"]*)"', text)
    assert any("/v2/buildq/contexts/blobs/sha256:" in uri for uri in uris), uris  # the uploaded context
    assert SECRET not in text
    # URLs carry no query string (a material's package URL, pkg:docker/…?platform=…, is no URL)
    assert all("?" not in uri for uri in uris if uri.startswith(("http://", "https://"))), uris
    print(
        f"\ngenuine provenance: attestation {attestation['digest']} for {attestation['subject']}; uris {uris}"
    )


def test_an_sbom_is_pushed_as_an_spdx_attestation(genuine, tmp_path, start_worker) -> None:
    env = deployment(genuine, tmp_path, 6)
    start_worker(env, concurrency=1)
    host = genuine["registry"].host
    record = (
        client_for(env)
        .submit({"context": str(scratch_context(tmp_path)), "tags": [f"{host}/demo/sbom:1"], "sbom": True})
        .wait(timeout=180)
    )
    assert record["state"] == "succeeded", record["error"]
    (attestation,) = record["image"]["attestations"]
    assert attestation["predicate_types"] == ["https://spdx.dev/Document"]
    (text,) = statements(host, "demo/sbom", attestation)
    statement = json.loads(text)
    assert statement["predicateType"] == "https://spdx.dev/Document"
    assert statement["subject"][0]["digest"]["sha256"] == attestation["subject"].removeprefix("sha256:")
    assert [f["fileName"] for f in statement["predicate"]["files"]] == ["app.txt"]
    print(f"\ngenuine sbom: attestation {attestation['digest']} for {attestation['subject']}")
