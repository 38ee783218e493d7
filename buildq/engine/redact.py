"""Mask secret values in log text before it leaves the worker.

:class:`Redactor` replaces every occurrence of each secret, of its base64 form (padded and unpadded,
standard and URL-safe alphabet), of its URL-encoded form (``quote`` and ``quote_plus``, upper-
and lower-case hex) and of its quoted forms (Go's ``%q``, JSON, Python's ``repr``) with ``***``.
All forms go into one compiled alternation, longest first, so a secret that contains another
secret is masked whole and each line is scanned once.

Values shorter than :data:`MIN_SECRET_LENGTH` (4) characters are ignored: masking ``a`` or ``42``
would shred ordinary output (every ``a`` becomes ``***``), and a value that short is guessable
anyway, so masking it would hide nothing while making logs useless. Empty values are ignored too.

Build output is redacted *after* base64 decoding and line assembly (see ``buildkit.plainlog``), one
line at a time; a multi-line secret is therefore also masked line by line (each line of it that is
at least 4 characters long). Output cut before its line ends (past 16 KiB) is cut where
:meth:`Redactor.safe_cut` says, so a value is masked whole, never piece by piece.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

MIN_SECRET_LENGTH = 4
MASK = "***"

_PERCENT = re.compile(r"%[0-9A-F]{2}")
_GO_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def secret_forms(secret: str) -> set[str]:
    """The spellings of one secret that are masked: itself, base64 and URL-encoded forms."""
    forms: set[str] = set()
    values = {secret, secret.strip()}
    if "\n" in secret:
        values.update(line.strip() for line in secret.splitlines())
    for value in values:
        if len(value) < MIN_SECRET_LENGTH:
            continue
        raw = value.encode("utf-8")
        for b64 in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
            forms.update((b64, b64.rstrip("=")))
        for url in (quote(value, safe=""), quote_plus(value)):
            forms.update((url, _PERCENT.sub(lambda m: m.group(0).lower(), url)))
        forms.update(escaped_forms(value))
        forms.add(value)
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def escaped_forms(value: str) -> set[str]:
    """``value`` as quoted strings print it: Go's ``%q`` and ``strconv.Quote`` (``\\"`` and
    ``\\\\``, control characters as ``\\n``/``\\xNN``), JSON (Python's and Go's, which also
    writes ``<``, ``>`` and ``&`` as ``\\u003c``…) and Python's ``repr``."""
    forms = {json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1], repr(value)[1:-1]}
    go = value.replace("\\", "\\\\").replace('"', '\\"')
    go = _GO_CONTROL.sub(lambda m: _GO_ESCAPES.get(m.group(0), f"\\x{ord(m.group(0)):02x}"), go)
    forms.add(go)
    html = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
    forms |= {"".join(html.get(c, c) for c in form) for form in list(forms)}
    return {form for form in forms if form != value}


def trie_pattern(words: Iterable[str]) -> str:
    """One regex matching any of ``words``, longest match first, with shared prefixes factored out.

    Equivalent to the alternation of the words sorted longest first, but the regex engine picks a
    branch by its next character instead of trying every word at every position.
    """
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, dict]) -> str:
        literal = []
        while len(node) == 1 and "" not in node:  # a chain of single children is one literal
            ((ch, node),) = node.items()
            literal.append(re.escape(ch))
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        rest = ""
        if alts:
            rest = alts[0] if len(alts) == 1 and "" not in node else "(?:" + "|".join(alts) + ")"
            if "" in node:
                rest += "?"  # greedy: a longer word is tried before ending here
        return "".join(literal) + rest

    return build(trie)


class Redactor:
    """Replace secret values (and their encoded forms) with ``***``; a no-op without secrets."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= secret_forms(secret)
        self._pattern = re.compile(trie_pattern(forms)) if forms else None
        #: the longest form masked: output cut anywhere must hold back this much less one
        self.longest = max(map(len, forms), default=0)

    def redact(self, text: str) -> str:
        """``text`` with every secret form replaced by ``***``."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

    __call__ = redact

    def safe_cut(self, data: bytes | bytearray, at: int) -> int:
        """Where ``data`` (output with more to come) may be cut at or before byte ``at`` so that the
        part before is redacted whole: no masked form spans the cut, and the tail after it is long
        enough to hold the start of one still arriving. ``at`` when no cut that size is safe."""
        if self._pattern is None:
            return at
        text = bytes(data).decode("utf-8", "surrogateescape")
        limit = len(bytes(data[:at]).decode("utf-8", "surrogateescape"))
        cut = min(limit, len(text) - (self.longest - 1))
        for match in self._pattern.finditer(text):
            if match.start() >= cut:
                break
            if match.end() > cut:
                cut = match.start()
                break
        if cut <= 0:
            return at
        return len(text[:cut].encode("utf-8", "surrogateescape"))

    def redact_tree(self, value: Any) -> Any:
        """``value`` with every string in it redacted (dict keys kept), walked here in one call."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact_tree(v) for v in value]
        return value


def secret_values(env_names: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """The values of the worker environment variables ``env_names`` (a job's secrets, the
    ``BUILDQ_REDACT_ENV`` names) that are set."""
    return [environ[name] for name in env_names if name in environ]


def redactor_for(env_names: Iterable[str], environ: Mapping[str, str]) -> Redactor | None:
    """A :class:`Redactor` for those variables' values, None when none is set (nothing to mask)."""
    secrets = secret_values(env_names, environ)
    return Redactor(secrets) if secrets else None
