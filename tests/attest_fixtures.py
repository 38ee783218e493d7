"""The genuine attestation captures (tests/fixtures/attest/, made by tests/capture_attestations.py)
for CI: the stand-in replays a capture's stream and metadata (:func:`replay_scenario`), and
:func:`seed_registry` puts what the genuine push put in its registry into a test registry, by the
same digests, so a worker reads back exactly what BuildKit pushed."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

ATTEST = Path(__file__).parent / "fixtures" / "attest"


def fixture(name: str) -> Path:
    return ATTEST / name


def metadata(name: str) -> dict[str, Any]:
    return json.loads((fixture(name) / "meta.json").read_text())


def replay_scenario(name: str) -> dict[str, Any]:
    """A stand-in ``succeed`` scenario replaying capture ``name``: its stream and its metadata file."""
    return {
        "kind": "succeed",
        "capture": str(fixture(name) / "stderr"),
        "metadata": str(fixture(name) / "meta.json"),
    }


def _documents(name: str) -> dict[str, tuple[bytes, str | None]]:
    """digest → (bytes, media type of a manifest or None for a blob)."""
    found: dict[str, tuple[bytes, str | None]] = {}
    for path in sorted((fixture(name) / "registry").iterdir()):
        if path.name.endswith(".type"):
            continue
        if path.name.endswith(".b64"):
            digest = path.name[: -len(".b64")].replace("_", ":", 1)
            found[digest] = (base64.b64decode(path.read_text()), None)
            continue
        digest = path.name.replace("_", ":", 1)
        kind = path.with_name(path.name + ".type")
        found[digest] = (path.read_bytes(), kind.read_text().strip() if kind.exists() else None)
    return found


def _send(method: str, url: str, body: bytes, content_type: str) -> Any:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(request, timeout=10)


def seed_registry(host: str, repo: str, name: str, tag: str) -> str:
    """Push capture ``name``'s blobs and manifests to ``host/repo`` (plain http), the index as
    ``tag``; the index digest."""
    docs = _documents(name)
    for digest, (body, media_type) in docs.items():
        if media_type is None:
            with _send(
                "POST", f"http://{host}/v2/{repo}/blobs/uploads/", b"", "application/octet-stream"
            ) as started:
                location = started.headers["Location"]
            if location.startswith("/"):
                location = f"http://{host}{location}"
            joiner = "&" if "?" in location else "?"
            _send("PUT", f"{location}{joiner}digest={digest}", body, "application/octet-stream").close()
    index = metadata(name)["containerimage.digest"]

    def put(digest: str, reference: str) -> None:
        body, media_type = docs[digest]
        assert media_type is not None
        for child in json.loads(body).get("manifests") or []:
            put(child["digest"], child["digest"])
        _send("PUT", f"http://{host}/v2/{repo}/manifests/{reference}", body, media_type).close()

    put(index, tag)
    return index
