"""Tell transient buildctl failures (retry the build) from permanent ones (do not).

buildctl exits 1 for every failure and prints ``error: <message>`` last, so failures are told
apart by text only. :func:`classify_failure` reads the final ``error:`` line first; only when
that line is absent or matches nothing does it read the rest: the ``error`` of each vertex of the
``--progress=rawjson`` stream (``ProgressTracker.vertex_errors``) and the ``#N ERROR: ...`` lines of
plain progress in the stderr tail.
Text that comes from the build itself (RUN step output, Dockerfile excerpts, vertex names that
quote the user's commands) and the harmless ``failed to configure registry cache importer`` of
a cold cache are never read.

Within one text the checks run in this order, first hit wins:

1. the operator's ``extra_transient`` regexes (``BUILDQ_TRANSIENT_PATTERNS``) → ``custom_transient``;
2. specific permanent causes (failing RUN step, Dockerfile syntax, missing file, bad reference,
   TLS, registry auth, missing image, bad cache config, 501/505, oversized gRPC message);
3. transient causes (gRPC ``Unavailable`` family, GOAWAY, RST_STREAM, daemon dialing, registry
   network errors, 5xx/429/408, ``ResourceExhausted``, deadlines, ``context canceled``,
   ``no space left on device``, other network errors);
4. generic permanent causes (``failed to parse``, CLI usage errors).

Anything else is permanent ``unknown`` with the raw message kept. Decisions worth knowing:
``no such host`` and ``429 Too Many Requests`` are transient (DNS and rate limits recover; a
mistyped host costs at most the retry budget), ``ResourceExhausted`` is transient except
``message larger than max`` (the same build always hits it), a RUN step's non-zero exit is
permanent whatever the step printed (including 137), ``context canceled`` that the caller did
not cause is transient.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .progress import ERROR_PREFIX


@dataclass(frozen=True, slots=True)
class Failure:
    """How a failed buildctl run failed: retryable or not, a short label, and buildctl's words."""

    transient: bool
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class _Rule:
    reason: str
    transient: bool
    pattern: re.Pattern[str]
    #: a second pattern that must also match somewhere in the same text (the context)
    context: re.Pattern[str] | None = None


def _rx(*alternatives: str) -> re.Pattern[str]:
    # Rules search lower-cased text (several times faster than re.IGNORECASE), so the patterns are
    # lower-cased here too: they must not use upper-case escapes such as \S, \D, \W or \B.
    return re.compile("|".join(f"(?:{a})" for a in alternatives).lower(), re.MULTILINE)


# fmt: off
# Network failures of any HTTP or gRPC client (Go net / net/http / x/net/http2 wordings).
_NET = _rx(
    r"connection refused", r"connection reset", r"broken pipe", r"i/o timeout", r"TLS handshake timeout",
    r"no such host", r"server misbehaving", r"temporary failure in name resolution",
    r"network is unreachable",
    r"(?:no route to|host is) (?:host|unreachable)", r"connection timed out", r"unexpected EOF",
    r"\": EOF\b", r": EOF$", r"use of closed network connection", r"read/write on closed pipe",
    r"timeout awaiting response headers", r"Client\.Timeout exceeded", r"context deadline exceeded",
    r"http2: client connection lost",
)
# Text that places a network error on the way to or from a registry (push, pull, cache, auth).
_REGISTRY = _rx(
    r"failed to (?:push|do request|copy|fetch|authorize|resolve source metadata|commit|upload)\b",
    r"failed commit on ref", r"httpReadSeeker", r"\b(?:HEAD|GET|PUT|POST|PATCH|DELETE) (?:request to )?\"?https?://",
    r"https?://[^\s\"]*/v2/", r"\bregistry\b", r"(?:exporting|importing) cache", r"\blookup [^\s:]+",
    r"(?:oauth|anonymous) token", r"\b(?:pushing|pulling)\b",
)

# The daemon's own state, whatever the step: its disk or its snapshotter. Transient for the job (another
# daemon can build it) and a reason to stop sending builds to that daemon for a while. Checked first:
# a full disk shows in any step's error ("ResourceExhausted: write …/containerdmeta.db: no space left
# on device", tests/fixtures/buildkit/errors/err_vii_disk_full_*).
_DAEMON_STATE = (
    _Rule("daemon_storage", True, _rx(
        r"no space left on device", r"read-only file system", r"disk quota exceeded",
        r"failed to (?:prepare|create|commit|mount|remove) (?:active |extraction )?snapshot",
        r"snapshotter[^\n]{0,80}?(?:error|failed)", r"input/output error",
    )),
)

_STRONG_PERMANENT = (
    _Rule("step_failed", False, _rx(
        r"did not complete successfully: exit code: -?\d+", r"executor failed running \[",
    )),
    _Rule("dockerfile_syntax", False, _rx(
        r"dockerfile parse error", r"\bunknown instruction: ", r"\bparse error on line \d+",
        r"unexpected end of statement", r"empty continuation lines?\b",
        r"\brequires (?:exactly|at least|at most) \w+ arguments?", r"\bunknown flag: ",
        r"failed to process \"[^\"\n]*\": ",
    )),
    _Rule("missing_file", False, _rx(
        r"\"[^\"\n]*\":? not found", r"failed to read dockerfile",
        r"failed to (?:compute cache key|calculate checksum)[^\n]*?no such file or directory",
    )),
    _Rule("invalid_reference", False, _rx(
        r"invalid reference format", r"failed to parse [^\n]{0,200}?reference",
        r"repository name (?:\([^)\n]*\) )?must be lowercase", r"couldn't parse image reference",
    )),
    _Rule("tls_error", False, _rx(
        r"x509: ", r"server gave HTTP response to HTTPS client",
        r"first record does not look like a TLS handshake",
        r"tls: (?:bad certificate|unknown certificate authority|certificate required|"
        r"failed to verify certificate|handshake failure)",
    )),
    _Rule("registry_auth", False, _rx(
        r"\b40[13] (?:unauthorized|forbidden)\b", r"status(?: code)?: 40[13]\b", r"\bunauthori[sz]ed\b",
        r"\bforbidden\b", r"insufficient_scope", r"requested access to the resource is denied",
        r"\b(?:pull|push) access denied", r"(?:^|[ :])denied: ", r"authentication required",
        r"authorization failed", r"incorrect username or password", r"no basic auth credentials",
    )),
    _Rule("permission_denied", False, _rx(
        r"code = (?:PermissionDenied|Unauthenticated)\b", r"(?:^|: )(?:PermissionDenied|Unauthenticated): ",
        r"permission denied",
    )),
    _Rule("image_not_found", False, _rx(
        r"failed to resolve source metadata for [^\n]*?"
        r"(?:: not found\b|manifest unknown|name unknown|no match for platform)",
        r"\bmanifest unknown\b",
    )),
    _Rule("invalid_cache_config", False, _rx(
        r"invalid configuration for remote cache", r"unknown cache (?:exporter|importer)",
        r"unsupported cache (?:type|exporter|importer)",
    )),
    _Rule("registry_unsupported", False, _rx(
        r"\b501 Not Implemented\b", r"\b505 HTTP Version Not Supported\b", r"status(?: code)?: 50[15]\b",
    )),
    _Rule("message_too_large", False, _rx(r"(?:received|trying to send) message larger than max")),
)

_TRANSIENT = (
    _Rule("stream_reset", True, _rx(r"RST_STREAM", r"stream error: stream ID \d+; \w+")),
    _Rule("goaway", True, _rx(r"prior goaway", r"\bGOAWAY\b")),
    _Rule("daemon_unreachable", True, _rx(
        r"error while dialing", r"\bdial unix ", r"failed to (?:list workers|dial)\b", r"listing workers",
        r"all SubConns are in TransientFailure",
    )),
    _Rule("registry_unavailable", True, _rx(
        r"(?:status|HTTP)[^\n]*?: (?:5(?!0[15])\d\d|429|408)\b",
        r"\b(?:500 Internal Server Error|502 Bad Gateway|503 Service Unavailable|504 Gateway Time-?out|"
        r"429 Too Many Requests|408 Request Time-?out)\b",
        r"toomanyrequests", r"too many requests",
    )),
    _Rule("registry_unavailable", True, _NET, context=_REGISTRY),
    _Rule("daemon_unavailable", True, _rx(
        r"code = Unavailable\b", r"(?:^|: )Unavailable: ", r"transport is closing",
        r"client connection is closing",
        r"closing transport due to", r"error reading from server", r"keepalive ping failed",
        r"connection error: desc", r"the connection is unavailable",
        r"server closed the stream without sending trailers",
    )),
    _Rule("resource_exhausted", True, _rx(r"code = ResourceExhausted\b", r"(?:^|: )ResourceExhausted: ")),
    _Rule("deadline_exceeded", True, _rx(
        r"code = DeadlineExceeded\b", r"(?:^|: )DeadlineExceeded: ", r"context deadline exceeded",
    )),
    _Rule("canceled", True, _rx(r"code = Canceled\b", r"(?:^|: )Canceled: ", r"context canceled")),
    _Rule("network_error", True, _NET),
)

_WEAK_PERMANENT = (
    _Rule("invalid_option", False, _rx(
        r"failed to parse", r"flag provided but not defined", r"Incorrect Usage",
    )),
)
# fmt: on

_RULES = _DAEMON_STATE + _STRONG_PERMANENT + _TRANSIENT + _WEAK_PERMANENT

#: Reasons that mean the daemon's own state failed the build (its disk, its snapshotter): the
#: daemon's circuit breaker opens and stays open a while, whatever its probe says.
DAEMON_STATE_REASONS = frozenset({"daemon_storage"})
#: Reasons that mean the build lost its daemon (a retry prefers another daemon).
DAEMON_LOST_REASONS = frozenset({"goaway", "daemon_unreachable", "daemon_unavailable"}) | DAEMON_STATE_REASONS
#: The reason of a run that never reached the daemon (dialing failed: nothing was built).
NEVER_REACHED_REASON = "daemon_unreachable"

#: Every reason label :func:`classify_failure` can return, by class (bounded: safe as a metric label).
TRANSIENT_REASONS = frozenset({r.reason for r in _TRANSIENT + _DAEMON_STATE} | {"custom_transient", "killed"})
PERMANENT_REASONS = frozenset({r.reason for r in _STRONG_PERMANENT + _WEAK_PERMANENT} | {"unknown", "killed"})

# Lines of the tail that are never classified (see the module docstring).
_IGNORED_LINE = re.compile(
    r"^(?:#\d+ (?!ERROR: )"  # plain progress other than "#N ERROR: ..." (step output, vertex names)
    r"|\s*\d+\.\d+ "  # timestamped step output in the error block ("0.234 ...")
    r"|\s*\d+ \|"  # Dockerfile excerpt ("   3 | >>> RUN ...")
    r"|\s*> )"  # " > [2/2] RUN ...:" header of the error block
)
_PLAIN_ERROR_PREFIX = re.compile(r"^#\d+ ERROR: ")
# Each text is searched within its first and last characters only (bounds the cost of huge lines).
_HEAD_CHARS, _TAIL_CHARS = 2048, 6144
_HARMLESS = re.compile(r"failed to configure registry cache importer")


@functools.lru_cache(maxsize=32)
def _compile_extra(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.MULTILINE) for p in patterns)


def _json_object(line: str) -> dict[str, object] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _bounded(text: str) -> str:
    """``text`` cut to its start and its end (Go error chains put the root cause last)."""
    if len(text) <= _HEAD_CHARS + _TAIL_CHARS:
        return text
    return text[:_HEAD_CHARS] + " ... " + text[-_TAIL_CHARS:]


def _scan(text: str, extra: tuple[re.Pattern[str], ...]) -> tuple[bool, str] | None:
    """(transient, reason) of the first rule, extras first, that matches ``text``; None if none does."""
    for pattern in extra:
        if pattern.search(text):
            return True, "custom_transient"
    low = text.lower()
    for rule in _RULES:
        if rule.pattern.search(low) and (rule.context is None or rule.context.search(low)):
            return rule.transient, rule.reason
    return None


def _is_signal_exit(exit_code: int) -> bool:
    return exit_code < 0 or 128 < exit_code <= 128 + 64


def classify_failure(
    exit_code: int,
    stderr_tail: Sequence[str],
    *,
    vertex_errors: Sequence[str] = (),
    extra_transient: Sequence[str] = (),
    killed_by_us: bool = False,
) -> Failure | None:
    """Classify one finished buildctl run from its exit code, the last lines of its stderr and the
    errors its progress stream reported on vertices (``vertex_errors``).

    Returns None when ``exit_code`` is 0, whatever the progress says (a cold build shows an
    ``ERROR`` for the missing cache and succeeds). Otherwise returns a :class:`Failure` whose
    ``message`` is the final ``error: ...`` line without its prefix, else the last non-empty
    non-JSON line, else ``buildctl exited with code N``.

    ``killed_by_us`` means the caller killed buildctl (cancel, timeout): always permanent
    ``killed``. A run killed by a signal nobody asked for (exit code < 0 or 128+N) that printed no
    error line is transient ``killed``. ``extra_transient`` regexes (searched per line, like
    ``re.MULTILINE``) make any text they match transient ``custom_transient``, before the built-in
    rules; an invalid regex raises ``re.error``. Never raises on any stderr content.
    """
    if exit_code == 0:
        return None
    extra = _compile_extra(tuple(extra_transient)) if extra_transient else ()
    error_index: int | None = None
    lines = [line.rstrip("\r\n") for line in stderr_tail]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(ERROR_PREFIX):
            error_index = index
            break
    error_text = lines[error_index][len(ERROR_PREFIX) :].strip() if error_index is not None else None

    message = error_text
    if message is None:
        message = next(
            (s for s in (line.strip() for line in reversed(lines)) if s and _json_object(s) is None), None
        )
    if not message:
        message = f"buildctl exited with code {exit_code}"

    if killed_by_us:
        return Failure(False, "killed", message)
    if error_text is None and _is_signal_exit(exit_code):
        return Failure(True, "killed", message)

    if error_text:
        found = _scan(_bounded(error_text), extra)
        if found is not None:
            return Failure(*found, message)

    texts = list(vertex_errors)
    for index, line in enumerate(lines):
        stripped = line.strip()
        if index == error_index or not stripped or stripped.startswith("{") or _IGNORED_LINE.match(line):
            continue  # the error line (read above), progress objects, build output
        texts.append(_PLAIN_ERROR_PREFIX.sub("", stripped))
    rest = [_bounded(t).replace("\n", " ") for t in texts if not _HARMLESS.search(t)]
    if rest:
        found = _scan("\n".join(rest), extra)
        if found is not None:
            return Failure(*found, message)
    return Failure(False, "unknown", message)
