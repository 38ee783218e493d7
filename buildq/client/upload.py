"""Upload a build context from the producer's machine: a registry blob that BuildKit downloads.

:func:`pack_context` makes a deterministic tar.gz of a directory with the docker SDK's
``.dockerignore`` logic (``docker.utils.build.exclude_paths``): the same files give the same bytes
(mtimes, owners and the gzip header zeroed), so the same context has the same digest.
:func:`upload_blob` puts it in a registry repository content-addressed (``HEAD`` first: an
unchanged context is not sent again), authenticating as docker does from its config file (Basic,
or the Bearer token flow), and returns the URL a job's ``context`` takes:
``http(s)://<host>/v2/<repo>/blobs/sha256:<hex>``. The BuildKit daemon fetches that URL without
credentials, so the repository must allow anonymous pulls (or sit on a network only builders reach).

Client side only: nothing here imports a worker module.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from ..errors import BuildqError, InvalidJobError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_CHUNK = 1024 * 1024


class ContextTooLarge(InvalidJobError):
    """The packed context is bigger than ``BUILDQ_CONTEXT_MAX_BYTES``; nothing was sent."""


class UploadError(BuildqError):
    """The registry refused or failed the upload (the message names the registry and status)."""


@dataclass(frozen=True)
class PackedContext:
    """A packed context: a temporary file (deleted on close), its size and digest."""

    file: IO[bytes]
    size: int
    digest: str  # sha256:<hex>
    files: int

    def close(self) -> None:
        self.file.close()


class _Limited:
    """A write-only file object that hashes, counts and refuses to pass ``limit`` bytes."""

    def __init__(self, out: IO[bytes], limit: int, context: str) -> None:
        self.out, self.limit, self.context = out, limit, context
        self.size, self.sha = 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise ContextTooLarge(
                f"context: {self.context!r} packs to more than {self.limit} bytes "
                "(BUILDQ_CONTEXT_MAX_BYTES); add a .dockerignore or raise the limit",
                field="context",
            )
        self.sha.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def dockerignore_patterns(root: str) -> list[str]:
    """The patterns of ``root/.dockerignore`` as the docker SDK reads them (blank and # lines out)."""
    path = os.path.join(root, ".dockerignore")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def context_files(root: str, dockerfile: str = "Dockerfile") -> list[str]:
    """Paths (relative to ``root``, sorted) the context sends: the docker SDK's ``.dockerignore``
    matching, the Dockerfile always kept."""
    from docker.utils.build import exclude_paths

    return sorted(exclude_paths(root, dockerignore_patterns(root), dockerfile=dockerfile))


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def pack_context(
    path: str, *, dockerfile: str = "Dockerfile", max_bytes: int = DEFAULT_MAX_BYTES
) -> PackedContext:
    """A deterministic tar.gz of the directory ``path`` minus what ``.dockerignore`` excludes.

    Raises :class:`ContextTooLarge` (an :class:`InvalidJobError` on ``context``) as soon as the
    archive passes ``max_bytes``, and InvalidJobError when ``path`` is no directory.
    """
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise InvalidJobError(f"context: {path!r} is not a directory", field="context")
    out = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the returned PackedContext
    limited = _Limited(out, max_bytes, path)
    count = 0
    try:
        with (
            gzip.GzipFile(fileobj=limited, mode="wb", mtime=0, filename="") as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in context_files(root, dockerfile):
                full = os.path.join(root, name)
                info = tar.gettarinfo(full, arcname=name)
                if info is None:  # a socket: docker skips it too
                    continue
                if info.isfile():
                    with open(full, "rb") as f:
                        tar.addfile(_normalised(info), f)
                else:
                    tar.addfile(_normalised(info))
                count += 1
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return PackedContext(out, limited.size, f"sha256:{limited.sha.hexdigest()}", count)


def split_repository(repository: str) -> tuple[str, str]:
    """``registry:5000/buildq/contexts`` → (``registry:5000``, ``buildq/contexts``); the host is required."""
    host, sep, repo = repository.partition("/")
    if not sep or not repo or not ("." in host or ":" in host or host == "localhost"):
        raise InvalidJobError(
            f"BUILDQ_CONTEXT_REPOSITORY: {repository!r} must be <registry host[:port]>/<repository>",
            field="BUILDQ_CONTEXT_REPOSITORY",
        )
    return host, repo


def registry_scheme(host: str, insecure_registries: Sequence[str]) -> str:
    """``http`` for hosts listed in ``BUILDQ_INSECURE_REGISTRIES`` (host:port, or a bare host), else https."""
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return "http" if host in insecure_registries or bare in insecure_registries else "https"


def docker_credentials(host: str) -> tuple[str, str] | None:
    """(user, password) for ``host`` as docker's config file has them (``auths``, credential
    helpers), through the docker SDK; None when it has none."""
    from docker import auth

    try:
        found = auth.resolve_authconfig(auth.load_config(), registry=host)
    except Exception:  # a broken helper or config: upload anonymously, the registry will say 401
        return None
    if not found or not found.get("username"):
        return None
    return found["username"], found.get("password") or ""


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → (``bearer``, {realm, service})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for part in _split_params(rest):
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return scheme.lower(), params


def _split_params(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in (*parts, current) if p.strip()]


class RegistrySession:
    """HTTP to one registry repository with docker's authentication (Basic or Bearer, on 401)."""

    def __init__(
        self,
        host: str,
        repo: str,
        scheme: str,
        credentials: Callable[[str], tuple[str, str] | None] = docker_credentials,
    ) -> None:
        import requests

        self.host, self.repo, self.base = host, repo, f"{scheme}://{host}"
        self.http = requests.Session()
        self.credentials = credentials
        self.auth_header: str | None = None

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._send(method, url, **kwargs)
        if response.status_code == 401 and self.auth_header is None:
            self.auth_header = self._authenticate(response.headers.get("WWW-Authenticate", ""))
            if self.auth_header is not None:
                if hasattr(kwargs.get("data"), "seek"):
                    kwargs["data"].seek(0)
                response = self._send(method, url, **kwargs)
        return response

    def _send(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        timeout = kwargs.pop("timeout", 60)
        if self.auth_header:
            headers["Authorization"] = self.auth_header
        import requests

        try:
            return self.http.request(method, url, headers=headers, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise UploadError(f"registry {self.host}: {method} failed: {type(exc).__name__}") from None

    def _authenticate(self, challenge: str) -> str | None:
        creds = self.credentials(self.host)
        scheme, params = parse_challenge(challenge)
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        if scheme == "basic":
            return basic
        if scheme != "bearer" or "realm" not in params:
            return None
        query = {"scope": f"repository:{self.repo}:pull,push"}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": basic} if basic else {}
        got = self.http.get(params["realm"], params=query, headers=headers, timeout=60)
        if got.status_code != 200:
            raise UploadError(f"registry {self.host}: token request failed: HTTP {got.status_code}")
        body = got.json()
        token = body.get("token") or body.get("access_token")
        return f"Bearer {token}" if token else None


@dataclass(frozen=True)
class Uploaded:
    """Where a context went: the blob URL for the job, its digest and size, and whether it was sent."""

    url: str
    digest: str
    size: int
    sent: bool


def upload_blob(packed: PackedContext, session: RegistrySession) -> Uploaded:
    """Put ``packed`` in the session's repository unless the registry has it already (HEAD)."""
    url = f"{session.base}/v2/{session.repo}/blobs/{packed.digest}"
    head = session.request("HEAD", url)
    if head.status_code == 200:
        return Uploaded(url, packed.digest, packed.size, sent=False)
    if head.status_code != 404:
        raise UploadError(f"registry {session.host}: HEAD {packed.digest}: HTTP {head.status_code}")
    start = session.request("POST", f"{session.base}/v2/{session.repo}/blobs/uploads/")
    if start.status_code != 202 or "Location" not in start.headers:
        raise UploadError(f"registry {session.host}: starting the upload: HTTP {start.status_code}")
    location = start.headers["Location"]
    if location.startswith("/"):
        location = session.base + location
    location += ("&" if "?" in location else "?") + f"digest={packed.digest}"
    packed.file.seek(0)
    put = session.request(
        "PUT",
        location,
        data=packed.file,
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(packed.size)},
        timeout=600,
    )
    if put.status_code != 201:
        raise UploadError(f"registry {session.host}: PUT {packed.digest}: HTTP {put.status_code}")
    return Uploaded(url, packed.digest, packed.size, sent=True)


def upload_context(
    path: str,
    *,
    repository: str,
    insecure_registries: Sequence[str] = (),
    dockerfile: str = "Dockerfile",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Uploaded:
    """Pack ``path`` and upload it to ``repository``; the returned ``url`` is the job's context."""
    host, repo = split_repository(repository)
    packed = pack_context(path, dockerfile=dockerfile, max_bytes=max_bytes)
    try:
        return upload_blob(packed, RegistrySession(host, repo, registry_scheme(host, insecure_registries)))
    finally:
        packed.close()
