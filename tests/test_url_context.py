"""Archive URL contexts: accepted by the job contract, built by BuildKit from the URL, and a
presigned URL's query string masked in logs and records."""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from buildq.contract.job import is_remote_context, is_url_context, parse_job, url_query_values
from buildq.engine.runner import build_request, dockerfile_dir
from buildq.errors import InvalidJobError
from buildq.launchers.base import BuildPaths
from tests.harness import client_for, free_port

TOKEN = "s3cr3tSignatureValue"


def _job(context: str, **over: object) -> dict[str, object]:
    return {"context": context, "tags": ["127.0.0.1:5000/demo/url:1"], **over}


@pytest.mark.parametrize(
    "url",
    [
        "http://registry:5000/v2/buildq/contexts/blobs/sha256:" + "a" * 64,
        "https://bucket.s3.amazonaws.com/ctx.tar.gz?X-Amz-Signature=abc&X-Amz-Expires=60",
        "http://127.0.0.1:8080/ctx.tar",
    ],
)
def test_archive_urls_are_remote_contexts(url: str) -> None:
    job = parse_job(_job(url))
    assert job.context == url and job.is_remote and not job.is_git
    assert is_url_context(url) and is_remote_context(url)
    req = build_request(job, BuildPaths(None, None, "/m.json"))
    assert req.remote_context == url and req.filename == "Dockerfile" and req.context_dir is None
    assert dockerfile_dir(job) is None


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/ctx.tar",
        "http://host/ctx.tar#frag",
        "http://host/a b.tar",
        "http:///ctx.tar",
        "file:///srv/app",
    ],
)
def test_other_urls_are_rejected_naming_context(url: str) -> None:
    with pytest.raises(InvalidJobError) as err:
        parse_job(_job(url))
    assert err.value.field == "context"


def test_git_url_stays_git() -> None:
    url = "https://github.com/moby/buildkit.git#v0.21.0:examples"
    assert not is_url_context(url) and is_remote_context(url)


def test_query_values_and_mask() -> None:
    url = f"https://b.example/ctx.tgz?X-Amz-Signature={TOKEN}&X-Amz-Expires=3600&flag"
    assert url_query_values(url) == [TOKEN, "3600", "flag"]
    assert url_query_values("https://b.example/ctx.tgz") == []
    assert url_query_values("/srv/app") == []


def _context_tgz(context_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(context_dir, arcname=".")
    return buf.getvalue()


@pytest.fixture
def archive_server(context_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering every GET with the context as tar.gz; yields (base URL, paths asked)."""
    body, seen = _context_tgz(context_dir), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_worker_builds_an_archive_url(buildq_env, start_worker, archive_server, standin_log) -> None:
    base, seen = archive_server
    start_worker(buildq_env)
    url = f"{base}/ctx.tar.gz?X-Amz-Signature={TOKEN}"
    client = client_for(buildq_env)
    handle = client.submit(_job(url))
    record = handle.wait(timeout=60)
    assert record["state"] == "succeeded", record
    assert seen == [f"/ctx.tar.gz?X-Amz-Signature={TOKEN}"]  # BuildKit (the stand-in) fetched it
    (start,) = standin_log.starts()
    assert f"context={url}" in start["argv"] and "--local" not in start["argv"]
    log = "\n".join(entry.line for entry in handle.logs())
    assert "[internal] load remote build context" in log
    assert TOKEN not in log


def test_presigned_token_is_masked_in_error_record_and_log(buildq_env, start_worker) -> None:
    # an unreachable URL is waited out like a registry that is away: for half a second here
    env = dict(buildq_env, BUILDQ_RETRY_MAX_ATTEMPTS="1", BUILDQ_REGISTRY_WAIT_S="0.5")
    start_worker(env)
    url = f"http://127.0.0.1:{free_port()}/ctx.tar.gz?X-Amz-Signature={TOKEN}&X-Amz-Expires=60"
    handle = client_for(env).submit(_job(url))
    record = handle.wait(timeout=60)
    assert record["state"] == "failed", record
    text = repr(record) + "\n".join(entry.line for entry in handle.logs())
    assert "connection refused" in record["error"]["message"]
    assert "X-Amz-Signature=***" in record["error"]["message"]
    assert TOKEN not in text
