"""What a push put in the registry: an image index's platform manifests and its attestations.

After a build that pushed an index (several platforms, or any attestation: BuildKit then pushes an
index even for one platform), the worker reads it back here: each platform's manifest digest, and
each attestation manifest (``vnd.docker.reference.type: attestation-manifest``) with the image
manifest it is for and the predicate types of its in-toto statement layers. Every document read is
checked against its digest (the registry is not trusted to answer for the digest asked). Anonymous
first; on 401 Basic or the Bearer token flow with docker's credentials for the host (docker SDK),
pull scope only. Nothing here writes to a registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .buildkit.command import INDEX_TYPES, is_index
from .contract.reference import parse_reference, registry_host
from .errors import BuildqError

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ATTESTATION_TYPE = "attestation-manifest"
INTOTO_LAYER = "application/vnd.in-toto+json"
#: the largest manifest or statement read (bytes)
MAX_DOCUMENT = 4 * 1024 * 1024

Credentials = Callable[[str], "tuple[str, str] | None"]


class RegistryReadError(BuildqError):
    """A registry read failed (the message names the registry, never a credential)."""


def docker_credentials(host: str) -> tuple[str, str] | None:
    """(user, password) for ``host`` from docker's config file (``auths``, helpers); None if none."""
    from docker import auth

    try:
        found = auth.resolve_authconfig(auth.load_config(), registry=host)
    except Exception:  # a broken helper or config: read anonymously
        return None
    if not found or not found.get("username"):
        return None
    return found["username"], found.get("password") or ""


def platform_text(platform: dict[str, Any] | None) -> str:
    """``linux/arm64/v8`` from an index entry's ``platform``."""
    platform = platform or {}
    parts = [str(platform.get("os") or "unknown"), str(platform.get("architecture") or "unknown")]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


@dataclass(frozen=True)
class Attestation:
    """One attestation manifest of an index: for which image manifest, and what it states."""

    digest: str
    subject: str
    platform: str | None
    predicate_types: list[str]
    statements: list[str]

    def as_record(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "subject": self.subject,
            "platform": self.platform,
            "predicate_types": list(self.predicate_types),
            "statements": list(self.statements),
        }


@dataclass(frozen=True)
class Pushed:
    """What an index holds: platform → manifest digest, and the attestation manifests."""

    digest: str
    platforms: dict[str, str] = field(default_factory=dict)
    attestations: list[Attestation] = field(default_factory=list)


class RegistryReader:
    """Reads manifests and blobs of one repository (``host/repo``) over http(s), all within
    ``timeout_s`` (a worker reads while it holds the job's claim: the budget stays below a lease)."""

    def __init__(
        self, reference: str, *, insecure: bool = False, timeout_s: float = 10.0,
        credentials: Credentials = docker_credentials,
    ) -> None:  # fmt: skip
        ref = parse_reference(reference)
        self.host = registry_host(ref)
        self.api_host = "registry-1.docker.io" if self.host == "docker.io" else self.host
        path = ref.path
        self.repo = f"library/{path}" if self.host == "docker.io" and "/" not in path else path
        self.base = f"{'http' if insecure else 'https'}://{self.api_host}"
        self.credentials = credentials
        #: every read of this reader ends by then (``timeout_s`` is the budget of all of them)
        self.deadline = time.monotonic() + timeout_s
        self.auth_header: str | None = None

    def manifest(self, digest: str) -> tuple[str, dict[str, Any]]:
        """The manifest ``digest`` (verified) and its media type."""
        accept = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
        body, headers = self._get(f"/v2/{self.repo}/manifests/{digest}", accept)
        _verify(body, digest, "manifest")
        doc = json.loads(body)
        media_type = doc.get("mediaType") or headers.get("Content-Type", "").split(";")[0]
        return str(media_type), doc

    def blob(self, digest: str) -> bytes:
        """The blob ``digest`` (verified)."""
        body, _ = self._get(f"/v2/{self.repo}/blobs/{digest}", "*/*")
        _verify(body, digest, "blob")
        return body

    def _get(self, path: str, accept: str) -> tuple[bytes, dict[str, str]]:
        url = self.base + path
        try:
            return self._send(url, accept)
        except urllib.error.HTTPError as exc:
            if exc.code != 401 or self.auth_header is not None:
                raise RegistryReadError(f"registry {self.host}: GET {path} answered {exc.code}") from None
            self.auth_header = self._authenticate(exc.headers.get("WWW-Authenticate", ""))
            if self.auth_header is None:
                raise RegistryReadError(f"registry {self.host}: GET {path} needs credentials") from None
        try:
            return self._send(url, accept)
        except urllib.error.HTTPError as exc:
            raise RegistryReadError(f"registry {self.host}: GET {path} answered {exc.code}") from None

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RegistryReadError(f"registry {self.host}: the reads took longer than their budget")
        return left

    def _send(self, url: str, accept: str) -> tuple[bytes, dict[str, str]]:
        request = urllib.request.Request(url, headers={"Accept": accept})
        if self.auth_header:
            request.add_header("Authorization", self.auth_header)
        try:
            with _opener().open(request, timeout=self._left()) as response:
                body = response.read(MAX_DOCUMENT + 1)
                headers = dict(response.headers.items())
        except urllib.error.HTTPError:
            raise
        except (OSError, ValueError) as exc:
            raise RegistryReadError(f"registry {self.host}: {type(exc).__name__}") from None
        if len(body) > MAX_DOCUMENT:
            raise RegistryReadError(f"registry {self.host}: a document larger than {MAX_DOCUMENT} bytes")
        return body, headers

    def _authenticate(self, challenge: str) -> str | None:
        creds = self.credentials(self.host)
        scheme, _, rest = challenge.strip().partition(" ")
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        if scheme.lower() == "basic":
            return basic
        params = dict(_challenge_params(rest))
        if scheme.lower() != "bearer" or "realm" not in params:
            return None
        query = {"scope": f"repository:{self.repo}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        request = urllib.request.Request(params["realm"] + "?" + urllib.parse.urlencode(query))
        if basic:
            request.add_header("Authorization", basic)
        try:
            with _opener().open(request, timeout=self._left()) as response:
                answer = json.loads(response.read(MAX_DOCUMENT))
        except (OSError, ValueError):
            raise RegistryReadError(f"registry {self.host}: the token service failed") from None
        token = answer.get("token") or answer.get("access_token")
        return f"Bearer {token}" if token else None


def _challenge_params(text: str) -> list[tuple[str, str]]:
    parts, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    pairs = []
    for part in parts:
        key, _, value = part.partition("=")
        if key.strip():
            pairs.append((key.strip().lower(), value.strip().strip('"')))
    return pairs


def _opener() -> urllib.request.OpenerDirector:
    """No proxies from the environment for a registry read (a loopback registry stays loopback)."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _verify(body: bytes, digest: str, what: str) -> None:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or hashlib.sha256(body).hexdigest() != hexdigest:
        raise RegistryReadError(f"the registry's {what} does not match its digest {digest}")


def read_pushed(reader: RegistryReader, digest: str) -> Pushed:
    """What the index ``digest`` holds: its platform manifests and its attestation manifests (each
    read for the predicate types of its in-toto layers). A plain manifest holds one platform, read
    from its config."""
    media_type, doc = reader.manifest(digest)
    if not is_index(media_type):
        config = json.loads(reader.blob(doc["config"]["digest"]))
        return Pushed(digest, platforms={platform_text(config): digest})
    platforms: dict[str, str] = {}
    by_digest: dict[str, str] = {}
    pending: list[dict[str, Any]] = []
    for entry in doc.get("manifests") or []:
        annotations = entry.get("annotations") or {}
        if annotations.get("vnd.docker.reference.type") == ATTESTATION_TYPE:
            pending.append(entry)
            continue
        name = platform_text(entry.get("platform"))
        platforms[name] = str(entry["digest"])
        by_digest[str(entry["digest"])] = name
    attestations = []
    for entry in pending:
        subject = str((entry.get("annotations") or {}).get("vnd.docker.reference.digest") or "")
        _, manifest = reader.manifest(str(entry["digest"]))
        layers = [layer for layer in manifest.get("layers") or [] if layer.get("mediaType") == INTOTO_LAYER]
        types = [
            str((layer.get("annotations") or {}).get("in-toto.io/predicate-type", "")) for layer in layers
        ]
        attestations.append(
            Attestation(
                digest=str(entry["digest"]),
                subject=subject,
                platform=by_digest.get(subject),
                predicate_types=types,
                statements=[str(layer["digest"]) for layer in layers],
            )  # fmt: skip
        )
    return Pushed(digest, platforms=platforms, attestations=attestations)
