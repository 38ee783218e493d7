"""Pre-dial checks of the buildctl stand-in, with buildctl v0.21.0's error texts.

Ports of cmd/buildctl/build/*.go (output, cache, secret, opt, local parsing) and go-csvvalue.
Each check raises :class:`BuildctlError` with the message buildctl prints after ``error: ``.
"""

from __future__ import annotations

import os
import sys

try:
    from . import standin_replay as R
except ImportError:  # run from the stand-in's folder (see buildctl_standin.py)
    import standin_replay as R  # type: ignore[no-redef]

ENTITLEMENTS = ("network.host", "security.insecure", "device")
PROGRESS_MODES = ("auto", "tty", "plain", "rawjson", "quiet", "")
QUOTE_ERR = 'extraneous or missing " in quoted-field'
BAD_OUTPUT = "invalid output option: output: "
ENOENT = "no such file or directory"


class BuildctlError(Exception):
    """Ends the run like buildctl's handleErr: ``error: <msg>`` on stderr, exit ``rc``."""

    def __init__(self, msg: str, rc: int = 1) -> None:
        super().__init__(msg)
        self.rc = rc


def go_quote(s: str) -> str:
    return R.dumps(s)


# ---- value checks (texts of cmd/buildctl/build/*.go and go-csvvalue) ---------------------------


def csv_fields(line: str) -> list[str]:
    """go-csvvalue Fields: comma separated, a field may be double-quoted (``""`` escapes)."""
    if line.endswith("\n"):
        line = line[:-2] if line.endswith("\r\n") else line[:-1]
    if not line:
        raise BuildctlError("EOF")
    out: list[str] = []
    pos = 0
    while True:
        if pos >= len(line) or line[pos] != '"':
            end = line.find(",", pos)
            field = line[pos:] if end < 0 else line[pos:end]
            if '"' in field:
                col = pos + field.index('"') + 1
                raise BuildctlError(f'parse error on line 1, column {col}: bare " in non-quoted-field')
            out.append(field)
            if end < 0:
                return out
            pos = end + 1
            continue
        pos += 1
        buf = []
        while True:
            q = line.find('"', pos)
            if q < 0:
                raise BuildctlError(f"parse error on line 1, column {pos + 1}: {QUOTE_ERR}")
            buf.append(line[pos:q])
            pos = q + 1
            if line.startswith('"', pos):
                buf.append('"')
                pos += 1
            elif pos == len(line):
                out.append("".join(buf))
                return out
            elif line[pos] == ",":
                out.append("".join(buf))
                pos += 1
                break
            else:
                raise BuildctlError(f"parse error on line 1, column {pos}: {QUOTE_ERR}")


def parse_entry(value: str, flag: str) -> tuple[str, dict]:
    """``--output``/``--export-cache``/``--import-cache`` CSV → (type, attrs)."""
    typ, attrs = "", {}
    for field in csv_fields(value):
        key, sep, val = field.partition("=")
        if not sep:
            raise BuildctlError(f"invalid value {field}")
        if key.lower() == "type":
            typ = val
        else:
            attrs[key.lower()] = val
    if not typ:
        raise BuildctlError(f"--{flag} requires type=<type>")
    return typ, attrs


def check_output(value: str) -> tuple[str, dict]:
    typ, attrs = parse_entry(value, "output")
    if "output" in attrs:
        out = attrs["output"]
        raise BuildctlError(f"output={out} not supported for --output, you meant dest={out}?")
    dest = attrs.get("dest", "")
    tar = attrs.get("tar", "true").lower() not in ("0", "f", "false")
    if typ == "local" or (typ in ("oci", "docker") and not tar):
        if not dest:
            raise BuildctlError(f"{BAD_OUTPUT}output directory is required for {typ} exporter")
    elif typ in ("tar", "oci", "docker"):
        if dest and dest != "-":
            if os.path.isdir(dest):
                raise BuildctlError(f"{BAD_OUTPUT}destination file is a directory")
            open(dest, "wb").close()
        elif os.isatty(1):
            raise BuildctlError(f"output file is required for {typ} exporter. refusing to write to console")
    elif dest:
        raise BuildctlError(f"{BAD_OUTPUT}output {dest} is not supported by {typ} exporter")
    return typ, attrs


def check_secret(value: str) -> None:
    try:
        fields = csv_fields(value)
    except BuildctlError as exc:
        raise BuildctlError(f"failed to parse csv secret: {exc}") from None
    typ, sid, src, env = "", "", "", ""
    for field in fields:
        key, sep, val = field.partition("=")
        if not sep:
            raise BuildctlError(f"invalid field '{field}' must be a key=value pair")
        key = key.lower()
        if key == "type":
            if val not in ("file", "env"):
                raise BuildctlError(f"unsupported secret type {go_quote(val)}")
            typ = val
        elif key == "id":
            sid = val
        elif key in ("source", "src"):
            src = val
        elif key == "env":
            env = val
        else:
            raise BuildctlError(f"unexpected key '{key}' in '{field}'")
    if typ == "env" and not env:
        env, src = src, ""
    if not sid:
        raise BuildctlError("secret missing ID")
    if not env and not src:
        if sid in os.environ:
            env = sid
        else:
            src = sid
    # env=VAR that is unset is accepted by buildctl v0.21.0 (the secret is empty).
    if src and not env and not os.path.exists(src):
        raise BuildctlError(f"failed to stat {src}: stat {src}: no such file or directory")


def attr_map(values: list[str], what: str) -> dict:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep:
            raise BuildctlError(f"invalid {what}: invalid value {v}")
        out[key] = val
    return out


def check_local_dir(path: str) -> None:
    """fsutil.NewFS: EvalSymlinks (error path is empty in the message), then a directory check."""
    probe = "/" if path.startswith("/") else ""
    for part in [p for p in path.split("/") if p]:
        probe = os.path.join(probe, part) if probe else part
        if not os.path.lexists(probe):
            raise BuildctlError(f"invalid local: resolve : lstat {probe}: no such file or directory")
    if not os.path.isdir(path):
        raise BuildctlError(f"invalid local: stat {path}: not a directory")


def validate_build(v: dict) -> dict:
    """Run buildctl's pre-dial checks in its order; return what the scenario needs."""
    for key in ("trace", "debug-json-cache-metrics"):
        target = v.get(key)
        if target in (None, "stdout", "stderr"):
            continue
        if not os.path.isdir(os.path.dirname(target) or "."):
            raise BuildctlError(f"open {target}: no such file or directory")
    for s in v.get("ssh", []):
        if s.split("=")[0] == "default" and "=" not in s and not os.environ.get("SSH_AUTH_SOCK"):
            raise BuildctlError("invalid empty ssh agent socket: make sure SSH_AUTH_SOCK is set")
    for s in v.get("secret", []):
        check_secret(s)
    for a in v.get("allow", []):
        if a.split("=")[0] not in ENTITLEMENTS:
            raise BuildctlError(f"unknown entitlement {a}")
    outputs = [check_output(o) for o in v.get("output", [])]
    for flag in ("export-cache", "import-cache"):
        for c in v.get(flag, []):
            if "type=" in c:
                parse_entry(c, flag)
    pol = v.get("source-policy-file")
    if pol:
        try:
            with open(pol, encoding="utf-8") as f:
                R.loads(f.read())
        except FileNotFoundError:
            raise BuildctlError(f"open {pol}: no such file or directory") from None
        except ValueError as exc:
            raise BuildctlError(f"failed to unmarshal source-policy-file {go_quote(pol)}: {exc}") from None
    opts = attr_map(v.get("opt", []), "opt")
    for path in attr_map(v.get("local", []), "local").values():
        check_local_dir(path)
    attr_map(v.get("oci-layout", []), "oci-layout")
    if not v.get("frontend"):
        if os.isatty(0):
            raise BuildctlError("please specify --frontend or pipe LLB definition to stdin")
        if not sys.stdin.buffer.read():
            raise BuildctlError("empty definition sent to build. Specify --frontend instead?")
    progress = v.get("progress", "auto")
    if progress not in PROGRESS_MODES:
        raise BuildctlError(f"invalid progress mode {progress}")
    if progress == "tty" and not os.isatty(2):
        raise BuildctlError("failed to get console: provided file is not a console")
    names = []
    for typ, attrs in outputs:
        if typ in ("image", "registry") and attrs.get("name"):
            names.append(attrs["name"])
    return {"opts": opts, "names": names, "progress": progress, "exports_cache": bool(v.get("export-cache"))}


# ---- remote (http/https) build contexts -------------------------------------------------------

DOWNLOAD = "failed to solve: failed to read downloaded context: failed to load cache key: "


def remote_context_url(opts: dict) -> str | None:
    """``--opt context=`` when it is an http(s) URL BuildKit downloads (not a git repository)."""
    ctx = opts.get("context", "")
    if not ctx.startswith(("http://", "https://")):
        return None
    path = ctx.split("#", 1)[0].split("?", 1)[0]
    return None if path.endswith(".git") else ctx  # dockerui.DetectGitContext: https git needs .git


def _go_dial_error(url: str, reason: object) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"{parts.hostname}:{port}"
    if isinstance(reason, ConnectionRefusedError):
        return f"dial tcp {host}: connect: connection refused"
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"dial tcp {host}: i/o timeout"
    return str(reason)


def fetch_remote_context(url: str, filename: str = "Dockerfile", timeout: float = 30.0) -> None:
    """Download ``url`` as BuildKit's http source would; check the Dockerfile is in it.

    A tar (plain or gzip) must hold ``filename``; anything else is the Dockerfile itself (as
    dockerui treats a download that is not an archive). Raises :class:`BuildctlError` with
    buildctl's texts: ``failed to read downloaded context: failed to load cache key: invalid
    response status 404`` (HTTP error) or ``… Get "<url>": dial tcp …`` (no connection), and
    ``failed to read dockerfile: open <filename>: no such file or directory``.
    """
    import io
    import tarfile
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    handlers = []
    if urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1"):
        handlers.append(urllib.request.ProxyHandler({}))  # Go's ProxyFromEnvironment skips loopback
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as exc:
        raise BuildctlError(f"{DOWNLOAD}invalid response status {exc.code}") from None
    except urllib.error.URLError as exc:
        raise BuildctlError(f"{DOWNLOAD}Get {go_quote(url)}: {_go_dial_error(url, exc.reason)}") from None
    except OSError as exc:
        raise BuildctlError(f"{DOWNLOAD}Get {go_quote(url)}: {_go_dial_error(url, exc)}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            names = {m.name.lstrip("/").removeprefix("./") for m in tar.getmembers() if not m.isdir()}
    except (tarfile.TarError, EOFError, OSError):
        return  # not an archive: the download is the Dockerfile
    if filename.lstrip("/").removeprefix("./") not in names:
        raise BuildctlError(f"failed to solve: failed to read dockerfile: open {filename}: {ENOENT}")
