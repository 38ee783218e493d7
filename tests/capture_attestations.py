"""Capture genuine BuildKit v0.21.0 runs with attestations for the stand-in (tests/fixtures/attest/).

``BUILDQ_TEST_BUILDKIT_BIN=/root/buildkit-rig/bin python -m tests.capture_attestations`` starts a
registry and a buildkitd of its own (tests/genuine.py), pushes a busybox base and a test SBOM
scanner made here (no pulls), runs three builds with the argv buildq's worker makes
(:func:`buildq.buildkit.command.build_argv`) and keeps, per build, in
``tests/fixtures/attest/<name>/``:
``cmd`` (the argv), ``stderr`` (the rawjson stream, verbatim), ``rc``, ``meta.json`` (the metadata
file) and ``registry/``: every manifest and blob the pushed index reaches, as the registry served
them, named by digest (a layer as base64 text in ``<digest>.b64``; a manifest beside a ``.type``
file with its media type). The builds are ``FROM scratch`` with a text file: no binary is kept.
:func:`tests.attest_fixtures.seed_registry` puts into another registry for CI.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from buildq.buildkit.command import BuildRequest, build_argv
from tests.genuine import Daemon, Registry, bin_dir, busybox_base

OUT = Path(__file__).parent / "fixtures" / "attest"
#: the granted secret of the provenance build: its statement must not hold it
SECRET_VALUE = "buildq-granted-secret-6f1d2c"
#: the test SBOM scanner's script: BuildKit's scanner protocol, an SPDX statement of the files it sees
SCAN_SH = OUT / "scanner" / "scan.sh"


def scanner_image(bins: Path, daemon: Daemon, registry: Registry, base: str, work: Path) -> str:
    """Push the test SBOM scanner (busybox + a shell script speaking BuildKit's scanner protocol)."""
    folder = work / "scanner"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCAN_SH, folder / "scan.sh")
    (folder / "Dockerfile").write_text(f'FROM {base}\nCOPY scan.sh /scan.sh\nCMD ["/bin/sh", "/scan.sh"]\n')
    ref = f"{registry.host}/test/sbom-scanner:1"
    subprocess.run(
        [
            str(bins / "buildctl"), "--addr", daemon.addr, "build", "--frontend", "dockerfile.v0",
            "--local", f"context={folder}", "--local", f"dockerfile={folder}",
            "--output", f"type=image,name={ref},push=true,registry.insecure=true",
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return ref


def get(registry: Registry, repo: str, what: str, ref: str) -> tuple[bytes, str]:
    accept = (
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
        "application/vnd.docker.distribution.manifest.v2+json"
    )
    request = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/{what}/{ref}", headers={"Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read(), response.headers.get("Content-Type", "")


def dump_registry(registry: Registry, repo: str, digest: str, into: Path) -> None:
    """Every manifest and blob the manifest ``digest`` reaches, named by digest."""
    into.mkdir(parents=True, exist_ok=True)
    body, media_type = get(registry, repo, "manifests", digest)
    (into / digest.replace(":", "_")).write_bytes(body)
    (into / (digest.replace(":", "_") + ".type")).write_text(media_type)
    doc = json.loads(body)
    for child in doc.get("manifests") or []:
        dump_registry(registry, repo, child["digest"], into)
    for blob in [doc["config"], *doc.get("layers", [])] if "config" in doc else []:
        data, _ = get(registry, repo, "blobs", blob["digest"])
        name = blob["digest"].replace(":", "_")
        try:
            data.decode("utf-8")
            (into / name).write_bytes(data)
        except UnicodeDecodeError:  # a layer (gzip of a text file): kept as base64 text
            (into / (name + ".b64")).write_text(base64.b64encode(data).decode() + "\n")


def capture(name: str, bins: Path, daemon: Daemon, registry: Registry, req: BuildRequest, ctx: Path,
            env: dict[str, str] | None = None) -> None:  # fmt: skip
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    argv = [str(bins / "buildctl"), *build_argv(req, insecure_registries=[registry.host])]
    done = subprocess.run(
        argv,
        capture_output=True,
        timeout=300,
        env={**os.environ, "BUILDKIT_HOST": daemon.addr, **(env or {})},
    )
    shown = [a.replace(str(ctx), "/build/ctx").replace(req.metadata_file, "/out/meta.json") for a in argv[1:]]
    (folder / "cmd").write_text(json.dumps(["buildctl", *shown]) + "\n")
    (folder / "stderr").write_bytes(done.stderr.replace(str(ctx).encode(), b"/build/ctx"))
    (folder / "rc").write_text(f"{done.returncode}\n")
    if done.returncode != 0:
        raise SystemExit(f"{name}: buildctl failed:\n{done.stderr.decode()[-2000:]}")
    meta = json.loads(Path(req.metadata_file).read_text())
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    repo = req.tags[0].split("/", 1)[1].rsplit(":", 1)[0]
    dump_registry(registry, repo, meta["containerimage.digest"], folder / "registry")
    print(f"{name}: {meta['containerimage.digest']}")


def main() -> None:
    bins = bin_dir()
    if bins is None:
        raise SystemExit("set BUILDQ_TEST_BUILDKIT_BIN to the folder of genuine buildctl/buildkitd")
    work = Path(tempfile.mkdtemp(prefix="buildq-capture-"))
    registry = Registry(work / "registry")
    daemon = Daemon(bins, work / "buildkitd", registry)
    try:
        base = busybox_base(bins, daemon, registry, work)
        scanner = scanner_image(bins, daemon, registry, base, work)
        ctx = work / "ctx"
        ctx.mkdir()
        (ctx / "app.txt").write_text("hello from buildq\n")
        (ctx / "Dockerfile").write_text("FROM scratch\nCOPY app.txt /app.txt\n")
        (ctx / "Dockerfile.arg").write_text("FROM scratch\nARG GREETING\nCOPY app.txt /app-$GREETING.txt\n")
        host = registry.host

        def request(tag: str, **fields: object) -> BuildRequest:
            return BuildRequest(
                tags=[f"{host}/{tag}"], cache_ref=f"{host}/{tag.split(':')[0]}:buildcache",
                metadata_file=str(work / f"{tag.replace('/', '_')}.meta.json"), context_dir=str(ctx),
                dockerfile_dir=str(ctx), **fields,  # type: ignore[arg-type]
            )  # fmt: skip

        capture("multiplatform", bins, daemon, registry,
                request("attest/multi:1", platforms=["linux/amd64", "linux/arm64"]), ctx)  # fmt: skip
        capture(
            "provenance_max", bins, daemon, registry,
            request("attest/prov:1", filename="Dockerfile.arg", build_args={"GREETING": "hi"},
                    platforms=["linux/amd64", "linux/arm64"], secrets=[("token", "BUILDQ_CAPTURE_TOKEN")],
                    provenance="max"),
            ctx, env={"BUILDQ_CAPTURE_TOKEN": SECRET_VALUE},
        )  # fmt: skip
        capture("sbom", bins, daemon, registry, request("attest/sbom:1", sbom_generator=scanner), ctx)
        (OUT / "captured.json").write_text(
            json.dumps({"registry": host, "scanner": scanner, "base": base}, indent=2) + "\n"
        )
    finally:
        daemon.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
