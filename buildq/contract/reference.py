"""Image references, validated against the OCI distribution reference grammar.

``reference := name [ ":" tag ] [ "@" digest ]`` with ``name := [domain "/"] path``, exactly as
``github.com/distribution/reference`` defines it (lower-case path components, tag
``[\\w][\\w.-]{0,127}``, name at most 255 characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE = re.compile(
    rf"^(?P<name>(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*))"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$",
    re.ASCII,  # \w is [A-Za-z0-9_], as in Go: a registry refuses any other letter at push time
)
NAME_MAX = 255


@dataclass(frozen=True)
class ImageReference:
    """A parsed reference; ``domain`` is None for Docker Hub short names like ``alpine``."""

    domain: str | None
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """The name without tag or digest (``registry:5000/team/app``)."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _looks_like_domain(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first != first.lower()


def parse_reference(text: str) -> ImageReference:
    """Parse ``text`` or raise ValueError saying what is wrong with it."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a non-empty image reference")
    bad = sorted({c for c in text if c in ",=\n\r\t \"'\\" or ord(c) < 32})
    if bad:
        raise ValueError(f"{text!r} is not a valid image reference: contains {''.join(bad)!r}")
    match = _REFERENCE.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a valid image reference (expected [registry[:port]/]path[:tag], "
            "lower-case path components)"
        )
    domain, path = match.group("domain"), match.group("path")
    # The grammar is ambiguous for "a/b": "a" is a domain only if it looks like one.
    if domain is not None and not _looks_like_domain(domain):
        path = f"{domain}/{path}"
        domain = None
    if len(match.group("name")) > NAME_MAX:
        raise ValueError(f"{text!r} is not a valid image reference: name longer than {NAME_MAX} characters")
    return ImageReference(domain=domain, path=path, tag=match.group("tag"), digest=match.group("digest"))


def registry_host(ref: ImageReference) -> str:
    """The registry host[:port] a reference is pushed to (``docker.io`` for short names)."""
    return ref.domain or "docker.io"
