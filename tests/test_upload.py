"""Uploaded contexts: packed with .dockerignore, content-addressed in a real registry (Debian's
docker-registry), sent once, limited in size, and built by a worker from the blob's URL."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildq.client.upload import (
    ContextTooLarge,
    UploadError,
    pack_context,
    parse_challenge,
    registry_scheme,
    split_repository,
    upload_context,
)
from buildq.errors import InvalidJobError
from tests.genuine import Registry
from tests.harness import client_for
from tests.harness import run_cli as cli

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # bcrypt for the registry's htpasswd (libxcrypt)

# Debian's docker-registry (``.ci/run`` installs it) and openssl are needed: without them the tests
# fail, never skip (a skipped test proves nothing)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry")
    yield reg
    reg.stop()


def _names(packed_bytes: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(packed_bytes), mode="r:gz") as tar:
        return sorted(m.name for m in tar.getmembers())


def _packed(path: Path, **kwargs: object) -> tuple[bytes, str]:
    packed = pack_context(str(path), **kwargs)  # type: ignore[arg-type]
    try:
        return packed.file.read(), packed.digest
    finally:
        packed.close()


def test_dockerignore_is_honoured_and_the_dockerfile_kept(context_dir: Path) -> None:
    (context_dir / "node_modules").mkdir()
    (context_dir / "node_modules" / "big.js").write_text("x" * 1000)
    (context_dir / "app" / "keep.py").write_text("print(1)")
    (context_dir / "app" / "debug.log").write_text("noise")
    (context_dir / ".dockerignore").write_text("# comment\nnode_modules\n**/*.log\nDockerfile\n")
    data, _ = _packed(context_dir)
    names = _names(data)
    assert "Dockerfile" in names  # docker keeps it even when .dockerignore names it
    assert "app/keep.py" in names and "hello.txt" in names
    assert not [n for n in names if n.startswith("node_modules") or n.endswith(".log")]


def test_same_content_same_digest_whatever_the_mtimes(context_dir: Path) -> None:
    _, first = _packed(context_dir)
    os.utime(context_dir / "hello.txt", (1, 1))
    os.utime(context_dir / "app", (2, 2))
    _, second = _packed(context_dir)
    assert first == second
    (context_dir / "hello.txt").write_text("changed")
    assert _packed(context_dir)[1] != first


def test_size_limit_stops_packing(context_dir: Path) -> None:
    (context_dir / "blob.bin").write_bytes(os.urandom(200_000))
    with pytest.raises(ContextTooLarge) as err:
        pack_context(str(context_dir), max_bytes=100_000)
    assert err.value.field == "context" and "BUILDQ_CONTEXT_MAX_BYTES" in err.value.message


def test_repository_scheme_and_challenge() -> None:
    assert split_repository("registry:5000/buildq/contexts") == ("registry:5000", "buildq/contexts")
    with pytest.raises(InvalidJobError):
        split_repository("contexts")
    assert registry_scheme("registry:5000", ["registry:5000"]) == "http"
    assert registry_scheme("registry:5000", ["registry"]) == "http"
    assert registry_scheme("ghcr.io", ["registry"]) == "https"
    assert parse_challenge('Bearer realm="https://auth/token",service="reg,istry"') == (
        "bearer",
        {"realm": "https://auth/token", "service": "reg,istry"},
    )


def test_upload_once_then_skip(context_dir: Path, registry: Registry) -> None:
    repo = f"{registry.host}/buildq/contexts"
    first = upload_context(str(context_dir), repository=repo, insecure_registries=[registry.host])
    assert first.sent and first.url == f"http://{registry.host}/v2/buildq/contexts/blobs/{first.digest}"
    body = urllib.request.urlopen(first.url, timeout=10).read()
    assert "Dockerfile" in _names(body) and len(body) == first.size
    again = upload_context(str(context_dir), repository=repo, insecure_registries=[registry.host])
    assert again == type(first)(first.url, first.digest, first.size, sent=False)


def test_basic_auth_from_docker_config(context_dir: Path, tmp_path: Path, monkeypatch) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{crypt.crypt('hunter22', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    reg = Registry(
        tmp_path / "authreg",
        extra_config=f"auth:\n  htpasswd:\n    realm: buildq\n    path: {htpasswd}\n",
    )
    try:
        repo = f"{reg.host}/buildq/contexts"
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
        with pytest.raises(UploadError, match="HTTP 401"):
            upload_context(str(context_dir), repository=repo, insecure_registries=[reg.host])
        (tmp_path / "dockercfg").mkdir()
        auth = base64.b64encode(b"ci:hunter22").decode()
        (tmp_path / "dockercfg" / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        done = upload_context(str(context_dir), repository=repo, insecure_registries=[reg.host])
        assert done.sent
    finally:
        reg.stop()


def _upload_env(buildq_env: dict[str, str], registry: Registry, **extra: str) -> dict[str, str]:
    return dict(
        buildq_env,
        BUILDQ_CONTEXT_REPOSITORY=f"{registry.host}/buildq/contexts",
        BUILDQ_INSECURE_REGISTRIES=registry.host,
        **extra,
    )


def test_cli_upload_round_trip(
    buildq_env, start_worker, context_dir, registry, standin_log, tmp_path
) -> None:
    env = _upload_env(buildq_env, registry, BUILDQ_CONTEXT_ROOTS=str(tmp_path / "nowhere"))
    start_worker(env)
    out = cli(
        env,
        "submit",
        "--context",
        str(context_dir),
        "--upload",
        "-t",
        "127.0.0.1:5000/d/up:1",
        "--wait",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["state"] == "succeeded", record
    (start,) = standin_log.starts()
    (context_opt,) = [a for a in start["argv"] if a.startswith("context=")]
    assert context_opt.startswith(f"context=http://{registry.host}/v2/buildq/contexts/blobs/sha256:")
    assert "--local" not in start["argv"]
    again = cli(env, "submit", "--context", str(context_dir), "--upload", "-t", "127.0.0.1:5000/d/up:2")
    assert again.returncode == 0, again.stderr
    assert "already in the registry" in again.stderr
    assert client_for(env).wait(again.stdout.strip(), timeout=60)["state"] == "succeeded"


def test_cli_upload_too_big_sends_nothing(buildq_env, context_dir, registry) -> None:
    (context_dir / "blob.bin").write_bytes(os.urandom(300_000))
    env = _upload_env(buildq_env, registry, BUILDQ_CONTEXT_MAX_BYTES="100000")
    out = cli(env, "submit", "--context", str(context_dir), "--upload", "-t", "127.0.0.1:5000/d/big:1")
    assert out.returncode == 2
    assert "BUILDQ_CONTEXT_MAX_BYTES" in out.stderr
    assert not (registry.root / "data" / "docker").exists()  # the registry never stored anything
    assert client_for(env).store.redis.keys("buildq:job:*") == []


def test_upload_without_repository_names_the_setting(buildq_env, context_dir) -> None:
    out = cli(buildq_env, "submit", "--context", str(context_dir), "--upload", "-t", "127.0.0.1:5000/d/x:1")
    assert out.returncode == 2 and "BUILDQ_CONTEXT_REPOSITORY" in out.stderr


def test_gzip_header_is_deterministic(context_dir: Path) -> None:
    data, _ = _packed(context_dir)
    assert data[4:8] == b"\0\0\0\0"  # gzip MTIME zeroed
    assert gzip.decompress(data)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenServer:
    """A token service for the registry's ``auth: token`` (the Bearer flow): checks Basic
    credentials, answers a JWT signed (RS256, ``openssl dgst``) with a key whose self-signed
    certificate the registry trusts. Records the scopes asked for."""

    def __init__(self, root: Path, user: str, password: str) -> None:
        import subprocess
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        self.key, self.cert = root / "key.pem", root / "cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
             "-out", str(self.cert), "-subj", "/CN=buildq-test-token", "-days", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self.scopes: list[str] = []
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = parse_qs(urlparse(self.path).query)
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                server_self.scopes.append(scope)
                _, name, actions = scope.split(":")
                body = json.dumps(
                    {"token": server_self.sign(der, query["service"][0], name, actions)}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.http.server_address[1]}/token"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def sign(self, der: bytes, service: str, name: str, actions: str) -> str:
        import subprocess
        import time as _time

        now = int(_time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": "buildq-test", "sub": "ci", "aud": service, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": os.urandom(8).hex(),
            "access": [{"type": "repository", "name": name, "actions": actions.split(",")}],
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_bearer_token_flow_with_docker_config(context_dir: Path, tmp_path: Path, monkeypatch) -> None:
    tokens = _TokenServer(tmp_path, "ci", "s3cret-pass")
    reg = Registry(
        tmp_path / "tokenreg",
        extra_config=(
            f"auth:\n  token:\n    realm: {tokens.realm}\n    service: buildq-test-registry\n"
            f"    issuer: buildq-test\n    rootcertbundle: {tokens.cert}\n"
        ),
    )
    try:
        repo = f"{reg.host}/buildq/contexts"
        (tmp_path / "dockercfg").mkdir()
        auth = base64.b64encode(b"ci:s3cret-pass").decode()
        (tmp_path / "dockercfg" / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
        first = upload_context(str(context_dir), repository=repo, insecure_registries=[reg.host])
        again = upload_context(str(context_dir), repository=repo, insecure_registries=[reg.host])
        assert first.sent and not again.sent
        assert tokens.scopes and set(tokens.scopes) == {"repository:buildq/contexts:pull,push"}
    finally:
        reg.stop()
        tokens.stop()
