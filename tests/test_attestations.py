"""Multi-platform images and attestations (docs/attestations.md): what the operator allows, the
buildctl flags, and the record naming what the registry holds, from genuine captures
(tests/fixtures/attest/) replayed by the stand-in against a real registry seeded with what the
genuine push put there, through real worker processes."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from buildq.buildkit.command import BuildRequest, build_argv
from buildq.contract.job import AttestationPolicy, context_secret_parts, effective_attestations, parse_job
from buildq.errors import InvalidJobError
from buildq.registry import RegistryReader, RegistryReadError, read_pushed
from tests.attest_fixtures import fixture, metadata, replay_scenario, seed_registry
from tests.conftest import scenario
from tests.genuine import Registry
from tests.harness import client_for, free_port, run_cli
from tests.test_producers import raw_celery_message

#: the granted secret's value in the genuine provenance capture (tests/capture_attestations.py)
CAPTURED_SECRET = "buildq-granted-secret-6f1d2c"
TOKEN = "presigned-token-4b1e"


def _job(**fields: Any) -> Any:
    return parse_job({"context": "/srv/app", "tags": ["reg/app:1"], **fields})


# -- what the operator allows (pure) ------------------------------------------------------------


def test_a_job_that_does_not_say_gets_the_operators_defaults() -> None:
    job = effective_attestations(_job(), AttestationPolicy())
    assert (job.provenance, job.sbom) == ("none", False)
    job = effective_attestations(_job(), AttestationPolicy(provenance_default="min", sbom_default=True))
    assert (job.provenance, job.sbom) == ("min", True)
    job = effective_attestations(
        _job(provenance="none", sbom=False), AttestationPolicy("max", sbom_default=True)
    )
    assert (job.provenance, job.sbom) == ("none", False)


def test_a_mode_or_an_sbom_the_operator_forbids_is_rejected_naming_the_field() -> None:
    with pytest.raises(InvalidJobError) as err:
        effective_attestations(_job(provenance="max"), AttestationPolicy(provenance_allowed=("min",)))
    assert err.value.field == "provenance" and "BUILDQ_PROVENANCE_ALLOWED" in str(err.value)
    with pytest.raises(InvalidJobError) as err:
        effective_attestations(_job(sbom=True), AttestationPolicy(sbom_allowed=False))
    assert err.value.field == "sbom"
    assert effective_attestations(_job(provenance="min"), AttestationPolicy(provenance_allowed=("min",)))


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize(
    "context",
    [
        f"https://bucket.example/ctx.tar.gz?X-Amz-Signature={TOKEN}",
        f"https://ci:{TOKEN}@git.example/org/app.git#main",
    ],
)
def test_provenance_is_refused_when_it_would_publish_the_context_urls_secret(mode: str, context: str) -> None:
    assert TOKEN in " ".join(context_secret_parts(context))
    with pytest.raises(InvalidJobError) as err:
        effective_attestations(_job(context=context, provenance=mode), AttestationPolicy())
    assert err.value.field == "provenance" and TOKEN not in str(err.value)
    # the operator's default is refused too (a pushed statement cannot be redacted afterwards)
    with pytest.raises(InvalidJobError):
        effective_attestations(_job(context=context), AttestationPolicy(provenance_default=mode))
    assert (
        effective_attestations(_job(context=context, provenance="none"), AttestationPolicy()).provenance
        == "none"
    )
    assert context_secret_parts("https://bucket.example/ctx.tar.gz") == []


def test_provenance_max_is_refused_for_a_build_arg_holding_a_granted_secret() -> None:
    job = _job(build_args={"TOKEN": f"x{TOKEN}x"}, provenance="max")
    with pytest.raises(InvalidJobError) as err:
        effective_attestations(job, AttestationPolicy(), secret_values=[TOKEN])
    assert err.value.field == "provenance" and "TOKEN" in str(err.value) and TOKEN not in str(err.value)
    # min records no build args
    assert effective_attestations(job.model_copy(update={"provenance": "min"}), AttestationPolicy(),
                                  secret_values=[TOKEN]).provenance == "min"  # fmt: skip


def test_a_job_that_does_not_ask_sends_no_attestation_fields() -> None:
    """An older worker (before these fields; unknown fields rejected) still takes such a job."""
    plain = _job(job_id="j1").to_message()
    assert not {"provenance", "sbom"} & set(plain)
    assert _job(job_id="j1", provenance="min", sbom=False).to_message() == {
        **plain,
        "provenance": "min",
        "sbom": False,
    }
    assert parse_job(plain) == _job(job_id="j1")


def test_the_argv_asks_buildkit_for_the_attestations() -> None:
    base = {"tags": ["reg/app:1"], "cache_ref": "reg/app:c", "metadata_file": "/m", "context_dir": "/c",
            "dockerfile_dir": "/c"}  # fmt: skip
    argv = build_argv(BuildRequest(**base, provenance="max", sbom_generator="reg/scanner:1"))  # type: ignore[arg-type]
    assert "attest:provenance=mode=max" in argv and "attest:sbom=generator=reg/scanner:1" in argv
    assert not [a for a in build_argv(BuildRequest(**base)) if a.startswith("attest:")]  # type: ignore[arg-type]


def test_a_registry_answer_that_does_not_match_its_digest_is_refused() -> None:
    """The index is read back from a registry the worker does not trust to answer for the digest."""
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": []}).encode()  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reader = RegistryReader(f"127.0.0.1:{server.server_address[1]}/app:1", insecure=True)
        with pytest.raises(RegistryReadError, match="does not match its digest"):
            read_pushed(reader, "sha256:" + "0" * 64)
    finally:
        server.shutdown()
        server.server_close()


# -- through the queue: genuine captures, a real registry, real workers -------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry")
    yield reg
    reg.stop()


def _index(host: str, repo: str, tag: str) -> dict[str, Any]:
    """The index as the registry serves it (read here with plain urllib, not buildq's reader)."""
    accept = (
        "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json"
    )
    request = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _blob(host: str, repo: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=10) as response:
        return response.read()


def _manifest(host: str, repo: str, digest: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _replayed(name: str, **fields: Any) -> dict[str, Any]:
    return {"build_args": {"STANDIN_SCENARIO": scenario(**replay_scenario(name))}, **fields}


def test_platforms_and_attestations_are_recorded_as_the_registry_holds_them(
    buildq_env, start_worker, context_dir, registry, standin_log, tmp_path
) -> None:
    host = registry.host
    env = {
        **buildq_env,
        "BUILDQ_INSECURE_REGISTRIES": host,
        "BUILDQ_SBOM_SCANNER_IMAGE": f"{host}/test/sbom-scanner:1",
        "BUILDQ_METRICS_PORT": str(free_port()),
        "BUILDQ_METRICS_DIR": str(tmp_path / "prom"),
    }
    for name in ("multiplatform", "provenance_max", "sbom"):
        seed_registry(host, f"ci/{name}", name, "1")
    start_worker(env, concurrency=2)
    client = client_for(env)
    ctx = str(context_dir)
    two = ["linux/amd64", "linux/arm64"]
    handles = {
        "multiplatform": client.submit({"context": ctx, "tags": [f"{host}/ci/multiplatform:1"],
                                        "platforms": two, **_replayed("multiplatform")}),
        "provenance_max": client.submit({"context": ctx, "tags": [f"{host}/ci/provenance_max:1"],
                                         "platforms": two, "provenance": "max",
                                         **_replayed("provenance_max")}),
    }  # fmt: skip
    # the SBOM job through the command line: buildq submit --sbom
    replay = f"STANDIN_SCENARIO={scenario(**replay_scenario('sbom'))}"
    submitted = run_cli(env, "submit", "--context", ctx, "--tag", f"{host}/ci/sbom:1", "--sbom",
                        "--build-arg", replay, "--wait", "--json")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    records = {name: handle.wait(timeout=90) for name, handle in handles.items()}
    records["sbom"] = json.loads(submitted.stdout)
    for name, record in records.items():
        assert record["state"] == "succeeded", (name, record["error"])
        assert record["image"]["digest"] == metadata(name)["containerimage.digest"]
        assert record["image"]["registry_error"] is None

    # the two platform manifests, with the digests the registry's index names
    for name in ("multiplatform", "provenance_max"):
        index = _index(host, f"ci/{name}", "1")
        images = [m for m in index["manifests"] if "annotations" not in m]
        held = {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"] for m in images}
        assert records[name]["image"]["platforms"] == held and sorted(held) == two
    assert records["multiplatform"]["image"]["attestations"] == []

    # provenance: one attestation manifest per platform, each naming its image manifest, and its
    # genuine statement names that digest and holds neither the granted secret nor a query string
    prov = records["provenance_max"]["image"]
    assert sorted(a["platform"] for a in prov["attestations"]) == two
    for attestation in prov["attestations"]:
        assert attestation["subject"] == prov["platforms"][attestation["platform"]]
        assert attestation["predicate_types"] == ["https://slsa.dev/provenance/v0.2"]
        (statement_digest,) = attestation["statements"]
        text = _blob(host, "ci/provenance_max", statement_digest).decode()
        statement = json.loads(text)
        assert statement["subject"][0]["digest"]["sha256"] == attestation["subject"].removeprefix("sha256:")
        assert CAPTURED_SECRET not in text and "?" not in json.dumps(statement["predicate"].get("materials"))
        layer = _manifest(host, "ci/provenance_max", attestation["digest"])["layers"][0]
        assert layer["digest"] == statement_digest

    # sbom: an SPDX statement for the one platform
    (sbom,) = records["sbom"]["image"]["attestations"]
    assert sbom["predicate_types"] == ["https://spdx.dev/Document"]
    assert sbom["subject"] == records["sbom"]["image"]["platforms"]["linux/amd64"]

    # what buildctl was asked for
    argv = {s["key"]: s["argv"] for s in standin_log.starts()}
    assert "attest:provenance=mode=max" in argv[f"{host}/ci/provenance_max:1"]
    assert f"attest:sbom=generator={host}/test/sbom-scanner:1" in argv[f"{host}/ci/sbom:1"]
    assert not [a for a in argv[f"{host}/ci/multiplatform:1"] if a.startswith("attest:")]
    assert "platform=linux/amd64,linux/arm64" in argv[f"{host}/ci/multiplatform:1"]

    # buildq status shows them
    shown = run_cli(env, "status", handles["provenance_max"].job_id)
    assert shown.returncode == 0, shown.stderr
    for platform, digest in prov["platforms"].items():
        assert platform in shown.stdout and digest in shown.stdout
    assert all(a["digest"] in shown.stdout for a in prov["attestations"]) and "provenance" in shown.stdout


def test_an_index_that_cannot_be_read_back_is_said_in_the_record(
    buildq_env, start_worker, context_dir
) -> None:
    """The push happened (buildctl said so); a registry that is away afterwards does not fail it."""
    gone = f"127.0.0.1:{free_port()}"
    env = {**buildq_env, "BUILDQ_INSECURE_REGISTRIES": gone, "BUILDQ_REGISTRY_READ_TIMEOUT_S": "3"}
    start_worker(env)
    record = client_for(env).submit(
        {"context": str(context_dir), "tags": [f"{gone}/ci/gone:1"],
         "platforms": ["linux/amd64", "linux/arm64"], **_replayed("multiplatform")}
    ).wait(timeout=60)  # fmt: skip
    assert record["state"] == "succeeded"
    assert record["image"]["platforms"] is None and record["image"]["attestations"] == []
    assert record["image"]["registry_error"].startswith(f"registry {gone}")


def test_a_stranger_asking_for_what_is_refused_gets_the_field_and_no_buildctl(
    buildq_env, start_worker, standin_log
) -> None:
    env = {**buildq_env, "BUILDQ_PROVENANCE_ALLOWED": "min", "BUILDQ_SBOM_ALLOWED": "false"}
    start_worker(env)
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    jobs = {
        "att-presigned": ({"context": f"https://bucket.example/ctx.tgz?X-Amz-Signature={TOKEN}",
                           "provenance": "min"}, "provenance"),
        "att-mode": ({"context": "https://bucket.example/ctx.tgz", "provenance": "max"}, "provenance"),
        "att-sbom": ({"context": "https://bucket.example/ctx.tgz", "sbom": True}, "sbom"),
        "att-typo": ({"context": "https://bucket.example/ctx.tgz", "provenance": "maximal"}, "provenance"),
    }  # fmt: skip
    for job_id, (fields, _) in jobs.items():
        job = {"job_id": job_id, "tags": ["reg/app:1"], **fields}
        r.lpush(
            env["BUILDQ_QUEUE"],
            raw_celery_message(job_id, env["BUILDQ_QUEUE"], {"job": job, "enqueued_at": time.time()}),
        )
    client = client_for(env)
    for job_id, (_, field) in jobs.items():
        record = client.wait(job_id, timeout=60)
        assert record["state"] == "failed" and record["error"]["kind"] == "invalid", record
        assert record["error"]["field"] == field, record["error"]
        assert TOKEN not in json.dumps(record)
    assert standin_log.events() == []


def test_a_bad_attestation_flag_is_one_line_naming_the_field(buildq_env) -> None:
    done = run_cli(buildq_env, "submit", "--context", "https://b.example/ctx.tgz", "--tag", "reg/app:1",
                   "--provenance", "maximal")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "provenance" in done.stderr, done.stderr


def test_the_captures_are_what_the_record_reads() -> None:
    """The fixtures hold each pushed document under its own digest (what seed_registry relies on)."""
    import hashlib

    for name in ("multiplatform", "provenance_max", "sbom"):
        for path in (fixture(name) / "registry").iterdir():
            if path.suffix == ".type":
                continue
            data = path.read_bytes()
            if path.suffix == ".b64":
                import base64

                data = base64.b64decode(data)
            digest = path.name.split(".")[0].replace("_", ":", 1)
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, path
