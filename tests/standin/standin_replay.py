"""Replay half of the buildctl stand-in: captures, timestamp shifting, metadata, flaky state, log.

Stdlib only and cheap to import (os, time, _json, the builtin sha256; random lazily): every
helper here runs in each stand-in process. Pure functions where possible so tests can check them directly.
"""

from __future__ import annotations

import _json  # the C half of json: importing json itself costs ~20 ms (re, enum)
import os
import time

TYPE_CHECKING = False  # importing typing / collections.abc costs ~5-10 ms per start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("STANDIN_FIXTURES") or os.path.join(HERE, "..", "fixtures", "buildkit")
DEFAULT_CAPTURE = "ctx_oci_rawjson_cold"
DEFAULT_ERROR = 'failed to solve: process "/bin/sh -c exit 1" did not complete successfully: exit code: 1'
UNAVAILABLE_DIAL = 'Unavailable: connection error: desc = "transport: Error while dialing: '
RPC_UNAVAILABLE = "failed to receive status: rpc error: code = Unavailable desc = "
TIME_KEYS = ("started", "completed", "timestamp")
ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
POLL_S = 0.05  # how often a running build looks at its simulated daemon's state
GOAWAY_CAPTURE = "err_iii_sigterm_sigkill_plain"
DISK_FULL_CAPTURE = "err_vii_disk_full_plain"
LOCAL_CONTEXT_NAME = "[internal] load build context"
REMOTE_CONTEXT_NAME = "[internal] load remote build context"
CACHE_EXPORT_NAME = "exporting cache to registry"


# ---- JSON without importing json ----------------------------------------------------------


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict = {}


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]


def _no_default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_encode = _json.make_encoder(
    None, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, True
)  # fmt: skip


def loads(text: str) -> object:
    """``json.loads`` via the C scanner (raises ValueError on bad input)."""
    text = text.strip(" \t\n\r")
    try:
        obj, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: line 1 column {exc.value + 1} (char {exc.value})") from None
    if end != len(text):
        raise ValueError(f"Extra data: line 1 column {end + 1} (char {end})")
    return obj


def dumps(obj: object) -> str:
    """Compact JSON (``separators=(",", ":")``), ASCII-escaped like ``json.dumps``."""
    return "".join(_encode(obj, 0))


def dumps_indent(obj: object, level: int = 0) -> str:
    """JSON indented by two spaces, keys in insertion order (Go's MarshalIndent layout)."""
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(obj, dict) and obj:
        body = ",\n".join(f"{pad}{dumps(str(k))}: {dumps_indent(v, level + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + end + "}"
    if isinstance(obj, list) and obj:
        return "[\n" + ",\n".join(pad + dumps_indent(v, level + 1) for v in obj) + "\n" + end + "]"
    return dumps(obj)


# ---- captures ---------------------------------------------------------------------------------


def capture_path(name: str, rawjson: bool) -> str:
    """Path of the stderr of capture ``name`` in the wanted progress mode.

    ``ctx_*_rawjson_*`` / ``ctx_*_plain_*`` swap to their pair; ``extra_*`` use ``.trace.json``
    (the rawjson stream) or ``.stderr`` (plain); ``err_*`` are used as they are; an absolute path
    is a capture file a test wrote itself.
    """
    if os.path.isabs(name):
        return name
    if name.startswith("extra_"):
        return os.path.join(FIXTURES, "extra", name + (".trace.json" if rawjson else ".stderr"))
    folder = "errors" if name.startswith("err_") else "builds"
    if folder == "builds":
        name = name.replace("_plain_", "_rawjson_") if rawjson else name.replace("_rawjson_", "_plain_")
    return os.path.join(FIXTURES, folder, name + ".stderr")


def read_lines(path: str) -> list[str]:
    """Progress lines of a capture, without any final ``error:`` line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln for ln in lines if not ln.startswith("error: ")]


def capture_error(name: str) -> str:
    """The text after ``error: `` on the last error line of an errors/ capture."""
    with open(os.path.join(FIXTURES, "errors", name + ".stderr"), encoding="utf-8") as f:
        errs = [ln for ln in f.read().split("\n") if ln.startswith("error: ")]
    if not errs:
        raise ValueError(f"capture {name} has no error line")
    return errs[-1][len("error: ") :]


def fixture_text(rel: str) -> str:
    with open(os.path.join(FIXTURES, rel), encoding="utf-8") as f:
        return f.read()


# ---- RFC 3339 timestamps (no datetime: it is slow to import) ----------------------------------


def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def parse_rfc3339_ns(s: str) -> int:
    """``2026-11-28T05:22:28.498817417Z`` → integer nanoseconds since the epoch (UTC only)."""
    if not s.endswith("Z") or len(s) < 20 or s[10] != "T":
        raise ValueError(f"not an RFC 3339 UTC timestamp: {s!r}")
    days = _days_from_civil(int(s[0:4]), int(s[5:7]), int(s[8:10]))
    secs = days * 86400 + int(s[11:13]) * 3600 + int(s[14:16]) * 60 + int(s[17:19])
    frac = s[20:-1] if s[19] == "." else ""
    return secs * 1_000_000_000 + int((frac + "000000000")[:9] or "0")


def format_rfc3339_ns(ns: int) -> str:
    """Inverse of :func:`parse_rfc3339_ns`, formatted like Go's RFC3339Nano (trailing zeros cut)."""
    secs, nanos = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    frac = f"{nanos:09d}".rstrip("0")
    return base + ("." + frac if frac else "") + "Z"


def _time_spans(line: str) -> list[tuple[int, int]]:
    spans = []
    for key in TIME_KEYS:
        pat = '"' + key + '":"'
        pos = line.find(pat)
        while pos >= 0:
            start = pos + len(pat)
            end = line.find('"', start)
            spans.append((start, end))
            pos = line.find(pat, end)
    return sorted(spans)


def line_times(line: str) -> list[int]:
    """All timestamps of a rawjson line, in nanoseconds."""
    return [parse_rfc3339_ns(line[a:b]) for a, b in _time_spans(line)]


def shift_line(line: str, delta_ns: int, pauses: list[tuple[int, int]] | None = None) -> str:
    """The same line, byte for byte, with every timestamp moved by ``delta_ns``.

    ``pauses`` are ``(capture_time_ns, slept_ns)``: a timestamp later than a pause's capture time is
    moved by that pause's sleep too, so time already reported (a vertex's ``started``, repeated in
    later updates) stays the same across a pause, as it does in a real stream.
    """
    out, last = [], 0
    for a, b in _time_spans(line):
        out.append(line[last:a])
        t = parse_rfc3339_ns(line[a:b])
        extra = sum(slept for at, slept in pauses or () if t > at)
        out.append(format_rfc3339_ns(t + delta_ns + extra))
        last = b
    out.append(line[last:])
    return "".join(out)


class Replayer:
    """Writes capture lines to stderr with timestamps shifted so the first one is "now".

    ``pace`` f: a line is written no earlier than f × (its capture offset) after the start (rawjson
    lines only: plain lines carry no timestamps). ``trace``: an open file that receives the rawjson
    stream ``trace_lines`` (shifted the same way) in step with the stderr lines, like ``--trace``.
    ``watch``: called before each line and every :data:`POLL_S` while sleeping (it may raise, e.g.
    when the simulated daemon goes away); without it sleeps are single ``time.sleep`` calls.
    """

    def __init__(
        self,
        lines: list[str],
        pace: float = 0.0,
        clock: Callable[[], int] = time.time_ns,
        trace: IO[str] | None = None,
        trace_lines: list[str] | None = None,
        watch: Callable[[], None] | None = None,
    ) -> None:
        self.lines, self.pace, self.clock, self.trace = lines, pace, clock, trace
        self.watch = watch
        self.trace_lines = lines if trace_lines is None else trace_lines
        self.pos = self.trace_pos = 0
        self.pauses: list[tuple[int, int]] = []  # (capture time reached, slept ns)
        self.trace_pauses: list[tuple[int, int]] = []
        self.reached: int | None = None
        self.trace_reached: int | None = None
        self.t0 = clock()
        self.first = _first_time(lines)
        self.delta = (self.t0 - self.first) if self.first is not None else 0
        trace_first = _first_time(self.trace_lines)
        self.trace_delta = (self.t0 - trace_first) if trace_first is not None else 0

    def emit(self, n: int | None = None) -> None:
        stop = len(self.lines) if n is None else min(len(self.lines), self.pos + n)
        while self.pos < stop:
            line = self.lines[self.pos]
            self.pos += 1
            if self.watch is not None:
                self.watch()
            times = line_times(line)
            if times:
                self.reached = max(times) if self.reached is None else max(self.reached, *times)
            if self.pace > 0 and times and self.first is not None:
                due = self.t0 + int(self.pace * (max(times) - self.first))
                wait = due - self.clock()
                if wait > 0:
                    self.sleep(wait / 1e9)
            write_err((shift_line(line, self.delta, self.pauses) if times else line) + "\n")
            if self.trace is not None:
                upto = -(-self.pos * len(self.trace_lines) // len(self.lines))  # ceil
                for tline in self.trace_lines[self.trace_pos : upto]:
                    ttimes = line_times(tline)
                    if ttimes:
                        self.trace_reached = max(
                            ttimes + ([self.trace_reached] if self.trace_reached else [])
                        )
                    self.trace.write(shift_line(tline, self.trace_delta, self.trace_pauses) + "\n")
                self.trace_pos = max(self.trace_pos, upto)

    def pause(self, seconds: float) -> None:
        """Sleep, then move the timestamps not yet reached (and pace deadlines) by the time slept."""
        if seconds <= 0:
            return
        before = self.clock()
        self.sleep(seconds)
        slept = self.clock() - before
        self.pauses.append((self.reached if self.reached is not None else -1, slept))
        self.trace_pauses.append((self.trace_reached if self.trace_reached is not None else -1, slept))
        self.t0 += slept

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, in slices of :data:`POLL_S` calling ``watch`` when there is one."""
        if self.watch is None:
            time.sleep(seconds)
            return
        end = time.monotonic() + seconds
        while True:
            self.watch()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, POLL_S))

    def hold(self) -> None:
        """Sleep until killed (or until ``watch`` raises)."""
        while True:
            self.sleep(3600)

    @property
    def remaining(self) -> int:
        return len(self.lines) - self.pos


def _first_time(lines: list[str]) -> int | None:
    times = [t for ln in lines for t in line_times(ln)]
    return min(times) if times else None


def write_err(text: str) -> None:
    data = text.encode("utf-8")
    while data:
        n = os.write(2, data)
        data = data[n:]


# ---- edits of a genuine stream (remote context, failed cache export) --------------------------


def remote_context_lines(lines: list[str]) -> list[str]:
    """The stream with the local-context vertex renamed as for an http(s) context (only that)."""
    return [ln.replace(LOCAL_CONTEXT_NAME, REMOTE_CONTEXT_NAME) for ln in lines]


def registry_repo(ref: str) -> tuple[str, str]:
    """``127.0.0.1:5000/demo/app:buildcache`` → (``127.0.0.1:5000``, ``demo/app``), as docker refs split."""
    ref = ref.split("@", 1)[0]
    first, slash, rest = ref.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        host, rest = "registry-1.docker.io", ref if slash else "library/" + ref
    else:
        host = first
    name, colon, tag = rest.rpartition(":")
    return host, (name if colon and "/" not in tag else rest)


def cache_export_error(ref: str, layer: str) -> str:
    """Vertex error of a registry cache export whose registry refused the connection.

    Shape of the genuine push failure of errors/err_vi_registry_down_rawjson (same host, same
    blob URL form) wrapped as BuildKit's remotecache exporter wraps a layer write error.
    """
    host, repo = registry_repo(ref)
    url = f"https://{host}/v2/{repo}/blobs/{layer}"
    return (
        f"error writing layer blob: failed to do request: Head {dumps(url)}: "
        f"dial tcp {host}: connect: connection refused"
    )


def cache_export_failed_lines(lines: list[str], rawjson: bool, error: str | None, ref: str) -> list[str]:
    """The stream cut where the cache export writes its first layer, which fails with ``error``.

    rawjson: the genuine lines up to the first ``writing layer`` status of the
    ``exporting cache to registry`` vertex, then one line made of genuine objects: that vertex
    from its completion line with ``"error"`` added (completed when the layer write completed),
    the layer status completed, and ``preparing build cache for export`` completed.
    plain: the genuine lines up to that layer, ``preparing build cache for export … done``,
    ``#N ERROR: …``, the genuine summaries after the section, then the vertex's summary block
    (as in builds/ctx_ocifalse_plain_cold).
    """
    if not rawjson:
        return _cache_export_failed_plain(lines, error, ref)
    vdigest, first = None, None
    for i, line in enumerate(lines):
        obj: Any = loads(line)
        for vx in obj.get("vertexes", []):
            if vx.get("name") == CACHE_EXPORT_NAME:
                vdigest = vx["digest"]
        if vdigest and any(
            st.get("vertex") == vdigest and st["id"].startswith("writing layer ")
            for st in obj.get("statuses", [])
        ):
            first = i
            break
    if first is None:
        raise ValueError("the capture has no cache export layer write")
    status = next(st for st in loads(lines[first])["statuses"]  # type: ignore[index]
                  if st.get("vertex") == vdigest and st["id"].startswith("writing layer "))  # fmt: skip
    layer_done = vertex = preparing = None
    for line in lines[first + 1 :]:
        obj = loads(line)
        for st in obj.get("statuses", []):
            if st["id"] == status["id"] and "completed" in st and layer_done is None:
                layer_done = st
            if st["id"] == "preparing build cache for export" and "completed" in st:
                preparing = st
        for vx in obj.get("vertexes", []):
            if vx.get("digest") == vdigest and "completed" in vx:
                vertex = vx
    if layer_done is None or vertex is None:
        raise ValueError("the capture's cache export does not complete")
    when = layer_done["completed"]
    failed = {**vertex, "completed": when, "error": error or cache_export_error(ref, status["id"][14:])}
    statuses = [layer_done]
    if preparing is not None:  # completes with the vertex (its timestamps move to the failure)
        statuses.append({**preparing, "timestamp": when, "completed": when})
    last = dumps({"vertexes": [failed], "statuses": statuses})
    return lines[: first + 1] + [last]


def _cache_export_failed_plain(lines: list[str], error: str | None, ref: str) -> list[str]:
    heads = [i for i, ln in enumerate(lines) if ln.startswith("#") and ln.endswith(" " + CACHE_EXPORT_NAME)]
    if not heads:
        raise ValueError("the capture has no cache export")
    head = heads[0]
    tag = lines[head].split(" ", 1)[0] + " "
    section_end = next(i for i in range(head, len(lines)) if lines[i].startswith(tag + "DONE"))
    layer = next(i for i in range(head, section_end) if lines[i].startswith(tag + "writing layer "))
    out = lines[: layer + 1]
    prep = tag + "preparing build cache for export"
    if not any(ln.startswith(prep) and ln.endswith(" done") for ln in out[head:]):
        done = [ln for ln in lines[layer:section_end] if ln.startswith(prep) and ln.endswith(" done")]
        out.append(done[0] if done else prep + " done")
    digest = lines[layer][len(tag + "writing layer ") :].split(" ")[0]
    out.append(tag + "ERROR: " + (error or cache_export_error(ref, digest)))
    out += lines[section_end + 1 :]
    return out + ["------", f" > {CACHE_EXPORT_NAME}:", "------"]


# ---- metadata ---------------------------------------------------------------------------------


def _sha256(data: bytes) -> Any:
    """hashlib.sha256 without importing hashlib (its OpenSSL binding costs ~4 ms per start)."""
    try:
        from _sha256 import sha256  # Python 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # Python 3.12+
        except ImportError:
            from hashlib import sha256
    return sha256(data)


def _sha(*parts: str) -> str:
    return "sha256:" + _sha256("\x00".join(parts).encode()).hexdigest()


def build_metadata(argv: list[str], image_names: list[str], exports_cache: bool) -> dict:
    """A ``--metadata-file`` body with the captures' keys; digests derive from ``argv``."""
    seed = dumps(argv)
    md: dict = {}
    if exports_cache:
        cache: dict[str, object] = {"mediaType": "application/vnd.oci.image.manifest.v1+json"}
        cache.update(digest=_sha(seed, "cache"), size=904)
        md["cache.manifest"] = dumps(cache)
    if image_names:
        digest = _sha(seed, "manifest")
        md["containerimage.config.digest"] = _sha(seed, "config")
        md["containerimage.descriptor"] = {
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "digest": digest,
            "size": 696,
            "platform": {"architecture": "amd64", "os": "linux"},
        }
        md["containerimage.digest"] = digest
        md["image.name"] = ",".join(image_names)
    return md


def captured_metadata(path: str, image_names: list[str], exports_cache: bool) -> dict:
    """A capture's ``--metadata-file`` as it was, with this build's image names (and without its
    ``cache.manifest`` when the cache export is not to have happened)."""
    with open(path, encoding="utf-8") as f:
        md = loads(f.read())
    assert isinstance(md, dict)
    md["image.name"] = ",".join(image_names)
    if not exports_cache:
        md.pop("cache.manifest", None)
    return md


def write_atomic(path: str, data: str) -> None:
    """Write like continuity.AtomicWriteFile: temp file in the same folder, then rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
    os.replace(tmp, path)


def new_ref_id(seed: str = "") -> str:
    """A 25-character build ref like BuildKit's identity.NewID()."""
    raw = _sha256((seed + str(time.time_ns()) + str(os.getpid())).encode()).digest()
    return "".join(ID_ALPHABET[b % 36] for b in raw[:25])


# ---- transient failures (flaky) ---------------------------------------------------------------


def dial_error(addr: str) -> str:
    """The gRPC dial failure text buildctl shows when nothing listens on ``addr``."""
    if addr.startswith("unix://"):
        return f"dial unix {addr[len('unix://') :]}: connect: no such file or directory"
    host = addr.split("://", 1)[-1]
    return f"dial tcp {host}: connect: connection refused"


def refused_text(addr: str, what: str = "listing workers for Build: ") -> str:
    return f'{what}failed to list workers: {UNAVAILABLE_DIAL}{dial_error(addr)}"'


def transient_texts(addr: str) -> list[str]:
    """Varied texts of the gRPC-Unavailable family (first one: connection refused at start)."""
    goaway = capture_error("err_iii_sigterm_sigkill_plain")
    return [
        refused_text(addr),
        goaway,
        RPC_UNAVAILABLE + "transport is closing",
        RPC_UNAVAILABLE + "error reading from server: EOF",
        RPC_UNAVAILABLE + "keepalive ping failed to receive ACK within timeout",
        f'failed to solve: {UNAVAILABLE_DIAL}{dial_error(addr)}"',
        RPC_UNAVAILABLE + "connection closed before server preface received",
    ]


def safe_name(key: str) -> str:
    """A file name for ``key``: its safe characters (80 at most) and 8 hex digits of its sha256."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:80]
    return safe + "-" + _sha256(key.encode()).hexdigest()[:8]


def claim_attempt(state_dir: str, key: str) -> int:
    """Number this invocation for ``key`` (1, 2, …) by creating ``<key>.<n>`` with O_EXCL."""
    os.makedirs(state_dir, exist_ok=True)
    safe = safe_name(key)
    n = 1
    while True:
        try:
            fd = os.open(os.path.join(state_dir, f"{safe}.{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return n


def flaky_outcome(scenario: dict, key: str, attempt: int, addr: str) -> str | None:
    """The error text this attempt fails with, or None when it succeeds (deterministic)."""
    import random

    rng = random.Random(f"{scenario.get('seed', 0)}:{key}:{attempt}")
    if "fail_first" in scenario:
        failing = attempt <= int(scenario["fail_first"])
    else:
        failing = rng.random() < float(scenario.get("p", 0.3))
    if not failing:
        return None
    texts = transient_texts(addr)
    return texts[rng.randrange(len(texts))]


# ---- invocation log ---------------------------------------------------------------------------


def log_event(record: dict) -> None:
    """Append one JSON line to ``$STANDIN_LOG`` (O_APPEND, a single write)."""
    path = os.environ.get("STANDIN_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (dumps(record) + "\n").encode())
    finally:
        os.close(fd)
