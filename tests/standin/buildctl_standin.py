#!/usr/bin/env python3
"""A stand-in for ``buildctl`` v0.21.0 (command line, checks, output) driven by a scenario.

Command line as urfave/cli v1 + Go's flag package parse it in buildctl: global options, then
``build``/``b`` or ``debug workers``; ``--flag value`` and ``--flag=value``; an unknown flag
prints ``Incorrect Usage: …`` and the help on stdout, ``error: …`` on stderr, exit 1.
The build checks what buildctl checks before it dials the daemon (CSV of --output/--*-cache/
--secret, ``--opt``/``--local`` as ``k=v``, local dirs exist, …) with buildctl's error texts.

What happens next is the scenario (JSON), from ``--opt build-arg:STANDIN_SCENARIO=…``, else env
``STANDIN_SCENARIO``, else ``{"kind":"succeed"}``; see tests/standin/README.md.
"""

from __future__ import annotations

import _signal  # signal itself imports enum (slow)
import os
import sys
import time

try:  # as tests.standin.buildctl_standin
    from . import standin_checks as S
    from . import standin_daemons as D
    from . import standin_replay as R
    from .standin_checks import BuildctlError, csv_fields, go_quote, validate_build
except ImportError:  # as a script, or from the buildctl wrapper (its folder on sys.path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import standin_checks as S  # type: ignore[no-redef]
    import standin_daemons as D  # type: ignore[no-redef]
    import standin_replay as R  # type: ignore[no-redef]
    from standin_checks import BuildctlError, csv_fields, go_quote, validate_build  # type: ignore[no-redef]

GLOBAL_FLAGS = {
    "debug": "bool", "addr": "str", "log-format": "str", "tlsservername": "str", "tlscacert": "str",
    "tlscert": "str", "tlskey": "str", "tlsdir": "str", "timeout": "int", "wait": "bool",
    "help": "bool", "version": "bool",
}  # fmt: skip
GLOBAL_ALIASES = {"h": "help", "v": "version"}
BUILD_FLAGS = {
    "output": "slice", "progress": "str", "trace": "str", "local": "slice", "oci-layout": "slice",
    "frontend": "str", "opt": "slice", "no-cache": "bool", "export-cache": "slice",
    "import-cache": "slice", "secret": "slice", "allow": "slice", "ssh": "slice",
    "metadata-file": "str", "source-policy-file": "str", "ref-file": "str",
    "registry-auth-tlscontext": "slice", "debug-json-cache-metrics": "str", "help": "bool",
}  # fmt: skip
BUILD_ALIASES = {"o": "output", "h": "help"}
WORKERS_FLAGS = {"filter": "slice", "verbose": "bool", "format": "str", "help": "bool"}
WORKERS_ALIASES = {"f": "filter", "v": "verbose", "h": "help"}
GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
            "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}  # fmt: skip
CANCELED = "failed to solve: Canceled: context canceled"


class UsageError(Exception):
    """A flag the Go flag package rejects."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived (buildctl cancels its context and exits 1)."""


def go_parse(args: list[str], flags: dict, aliases: dict) -> tuple[dict, list[str]]:
    """Parse like Go's flag.FlagSet.Parse: stop at the first non-flag or after ``--``."""
    values: dict = {}
    i = 0
    while i < len(args):
        s = args[i]
        if len(s) < 2 or s[0] != "-":
            break
        minus = 2 if s[1] == "-" else 1
        if minus == 2 and len(s) == 2:
            i += 1
            break
        name = s[minus:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {s}")
        i += 1
        has, value = False, ""
        eq = name.find("=", 1)
        if eq > 0:
            name, value, has = name[:eq], name[eq + 1 :], True
        canon = aliases.get(name, name)
        kind = flags.get(canon)
        if kind is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if kind == "bool":
            if has and value not in GO_BOOLS:
                raise UsageError(f"invalid boolean value {go_quote(value)} for -{name}: parse error")
            values[canon] = GO_BOOLS[value] if has else True
            continue
        if not has and i < len(args):
            value, has, i = args[i], True, i + 1
        if not has:
            raise UsageError(f"flag needs an argument: -{name}")
        if kind == "int":
            try:
                int(value, 0)
            except ValueError:
                raise UsageError(f"invalid value {go_quote(value)} for flag -{name}: parse error") from None
        if kind == "slice":
            values.setdefault(canon, []).append(value)
        else:
            values[canon] = value
    return values, args[i:]


def reorder_args(flags: dict, aliases: dict, args: list[str]) -> list[str]:
    """urfave/cli v1 ``reorderArgs``: known flags (and a following value) first, the rest after."""

    def is_flag(arg: str) -> bool:
        if arg in ("-", "--") or not arg.startswith("-"):
            return False
        name = arg.lstrip("-") if arg.startswith("--") else arg[1:]
        name = name.split("=")[0]
        return name in flags or name in aliases

    flagged: list[str] = []
    rest: list[str] = []
    expect_value = False
    for i, arg in enumerate(args):
        if expect_value and not is_flag(arg):
            expect_value = False
            flagged.append(arg)
        elif arg == "--":
            rest = ["--", *rest, *args[i + 1 :]]
            break
        elif is_flag(arg):
            flagged.append(arg)
            expect_value = "=" not in arg
        else:
            rest.append(arg)
    return flagged + rest


def stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def help_text(name: str) -> str:
    text = R.fixture_text(f"version/{name}")
    return "".join(ln + "\n" for ln in text.split("\n") if not ln.startswith("rc="))[:-1]


# ---- scenario -------------------------------------------------------------------------------


def load_scenario(opts: dict) -> dict:
    raw = opts.get("build-arg:STANDIN_SCENARIO") or os.environ.get("STANDIN_SCENARIO") or '{"kind":"succeed"}'
    try:
        scenario = R.loads(raw)
    except ValueError as exc:
        raise BuildctlError(f"stand-in: invalid STANDIN_SCENARIO: {exc}", rc=2) from None
    if not isinstance(scenario, dict):
        raise BuildctlError("stand-in: STANDIN_SCENARIO must be a JSON object", rc=2)
    return scenario


def cache_refs(values: list[str]) -> list[str]:
    """The ``ref=`` of each ``--export-cache``/``--import-cache`` value (already checked)."""
    refs = []
    for value in values:
        for field in csv_fields(value):
            key, _, val = field.partition("=")
            if key.lower() == "ref" and val:
                refs.append(val)
    return refs


def run_build(addr: str, v: dict, info: dict, scenario: dict, rec: dict) -> int:
    """Dial the (simulated) daemon, then replay a capture according to ``scenario``; return the exit code."""
    kind = scenario.get("kind", "succeed")
    exports, imports = cache_refs(v.get("export-cache", [])), cache_refs(v.get("import-cache", []))
    rec["cache_key"] = (exports or imports or info["names"] or [rec["key"]])[0]
    daemon = D.daemon_for(addr)
    if daemon is not None:
        rec["daemon"], rec["cmd"] = daemon, "build"
        daemon.dial(rec["cmd"])
        if daemon.state().get("disk_full"):  # its disk is full: every build fails as the genuine one
            raise BuildctlError(R.capture_error(R.DISK_FULL_CAPTURE))
    capture = scenario.get("capture")
    if daemon is not None and capture is None and kind in ("succeed", "flaky"):
        rec["variant"] = daemon.variant(rec["cache_key"], imports)
        capture = f"ctx_oci_rawjson_{rec['variant']}"
    capture = capture or R.DEFAULT_CAPTURE
    remote = S.remote_context_url(info["opts"]) if kind != "refused" else None
    if remote:
        S.fetch_remote_context(remote, info["opts"].get("filename") or "Dockerfile")
    rawjson = info["progress"] == "rawjson"

    def stream(raw: bool) -> list[str]:
        lines = R.read_lines(R.capture_path(capture, raw))
        if remote:
            lines = R.remote_context_lines(lines)
        if scenario.get("cache_export") in ("fail", "fail-strict"):
            ref = (exports or ["127.0.0.1:5000/demo/app:buildcache"])[0]
            lines = R.cache_export_failed_lines(lines, raw, scenario.get("cache_export_error"), ref)
        return lines

    lines = [] if info["progress"] == "quiet" else stream(rawjson)
    pace = float(scenario.get("pace", 0))
    watch = daemon.watch if daemon is not None else None
    if not v.get("trace"):
        return play(R.Replayer(lines, pace, watch=watch), addr, v, info, scenario, rec)
    trace_lines = lines if rawjson else stream(True)
    with open(v["trace"], "a", encoding="utf-8") as trace:  # --trace gets the rawjson stream
        rep = R.Replayer(lines, pace, trace=trace, trace_lines=trace_lines, watch=watch)
        return play(rep, addr, v, info, scenario, rec)


def play(rep: R.Replayer, addr: str, v: dict, info: dict, scenario: dict, rec: dict) -> int:
    kind = scenario.get("kind", "succeed")
    after = int(scenario.get("after_lines", 5))
    if v.get("ref-file"):
        R.write_atomic(v["ref-file"], R.new_ref_id(rec["key"] or ""))
    if kind == "flaky":
        attempt = R.claim_attempt(scenario["state_dir"], rec["key"] or "default")
        rec["attempt"] = attempt
        err = R.flaky_outcome(scenario, rec["key"] or "default", attempt, addr)
        if err is not None:
            rep.emit(0 if err == R.refused_text(addr) else after)
            raise BuildctlError(err)
        kind = "succeed"
    if kind == "refused":
        raise BuildctlError(R.refused_text(addr))
    if kind == "succeed":
        rep.emit(rep.remaining // 2)
        rep.pause(float(scenario.get("sleep_s", 0)))
        rep.emit()
        export = scenario.get("cache_export")
        if export == "fail-strict":  # no ignore-error=true: the build fails, image already pushed
            text = scenario.get("cache_export_error") or cache_export_text(rep.lines)
            raise BuildctlError(f"failed to solve: {text}")
        daemon = rec.get("daemon")
        if daemon is not None:
            daemon.record_built(rec["cache_key"])
            if export != "fail":
                for ref in cache_refs(v.get("export-cache", [])):
                    daemon.record_exported(ref)
        if v.get("metadata-file"):
            exported = info["exports_cache"] and export != "fail"
            md = R.build_metadata(rec["argv"], info["names"], exported)
            if scenario.get("metadata"):  # a capture's own metadata file (tests/fixtures/attest/)
                md = R.captured_metadata(scenario["metadata"], info["names"], exported)
            R.write_atomic(v["metadata-file"], R.dumps_indent(md))
        return 0
    if kind == "fail":
        rep.emit(after)
        rep.pause(float(scenario.get("sleep_s", 0)))
        if "error_capture" in scenario:
            text = R.capture_error(scenario["error_capture"])
        else:
            text = scenario.get("error", R.DEFAULT_ERROR)
        raise BuildctlError(text, rc=int(scenario.get("rc", 1)))
    if kind == "hang":
        rep.emit(after)
        rep.hold()
    raise BuildctlError(f"stand-in: unknown scenario kind {kind!r}", rc=2)


def cache_export_text(lines: list[str]) -> str:
    """The cache export error of an edited stream (rawjson ``"error"`` or plain ``#N ERROR:``)."""
    for line in reversed(lines):
        if line.startswith("{"):
            for vx in R.loads(line).get("vertexes", []):  # type: ignore[union-attr]
                if vx.get("name") == R.CACHE_EXPORT_NAME and "error" in vx:
                    return vx["error"]
        elif line.startswith("#") and " ERROR: " in line:
            return line.split(" ERROR: ", 1)[1]
    return R.cache_export_error("127.0.0.1:5000/demo/app:buildcache", "sha256:unknown")


# ---- commands -------------------------------------------------------------------------------


def cmd_build(g: dict, args: list[str], rec: dict) -> int:
    try:
        v, _ = go_parse(reorder_args(BUILD_FLAGS, BUILD_ALIASES, args), BUILD_FLAGS, BUILD_ALIASES)
    except UsageError as exc:
        stdout(f"Incorrect Usage: {exc}\n\n" + help_text("buildctl_build_help.txt"))
        raise BuildctlError(str(exc)) from None
    if v.get("help"):
        stdout(help_text("buildctl_build_help.txt"))
        return 0
    info = validate_build(v)
    scenario = load_scenario(info["opts"])
    return run_build(g["addr"], v, info, scenario, rec)


def cmd_debug(g: dict, args: list[str], rec: dict) -> int:
    if not args or args[0] != "workers":
        raise BuildctlError("stand-in: only 'debug workers' is imitated", rc=2)
    try:
        reordered = reorder_args(WORKERS_FLAGS, WORKERS_ALIASES, args[1:])
        v, _ = go_parse(reordered, WORKERS_FLAGS, WORKERS_ALIASES)
    except UsageError as exc:
        stdout(f"Incorrect Usage: {exc}\n\n")
        raise BuildctlError(str(exc)) from None
    daemon = D.daemon_for(g["addr"])
    if daemon is not None:
        rec["daemon"], rec["cmd"] = daemon, "debug-workers"
        daemon.dial(rec["cmd"], what="")
    scenario = load_scenario({})
    kind = scenario.get("kind", "succeed")
    if kind == "refused":  # a flaky daemon answers: only its builds fail now and then
        raise BuildctlError(R.refused_text(g["addr"], what=""))
    if kind == "fail":
        raise BuildctlError(scenario.get("error") or R.refused_text(g["addr"], what=""))
    text = R.fixture_text("version/buildctl_debug_workers.txt")
    if v.get("verbose"):
        stdout(text)
    else:
        wid = text.split("\n", 1)[0].split("\t")[-1]
        plats = text.split("\n")[1].split("\t")[-1]
        stdout(f"ID\t\t\t\tPLATFORMS\n{wid}\t{plats}\n")
    return 0


def guess_key(argv: list[str]) -> str | None:
    """The flaky/log key: the scenario's ``key``, else the first name of the first ``--output``."""
    key, raw = None, os.environ.get("STANDIN_SCENARIO") or ""
    for i, arg in enumerate(argv):
        name, eq, val = arg.partition("=")
        if not eq:
            val = argv[i + 1] if i + 1 < len(argv) else ""
        if name in ("--output", "-output", "-o", "--o") and key is None:
            try:
                fields = csv_fields(val)
            except BuildctlError:
                fields = []
            names = [f[5:] for f in fields if f.lower().startswith("name=")]
            key = names[0].split(",")[0] if names else None
        if val.startswith("build-arg:STANDIN_SCENARIO="):
            raw = val.split("=", 1)[1]
    try:
        scenario = R.loads(raw) if raw else {}
    except ValueError:
        scenario = {}
    return (scenario.get("key") if isinstance(scenario, dict) else None) or key


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted()


def main(argv: list[str]) -> int:
    rec = {"pid": os.getpid(), "argv": ["buildctl", *argv], "started": time.time(), "key": guess_key(argv)}
    R.log_event({"event": "start", **{k: rec[k] for k in ("pid", "argv", "started", "key")}})
    _signal.signal(_signal.SIGTERM, _on_signal)
    _signal.signal(_signal.SIGINT, _on_signal)
    outcome, rc, error = "succeeded", 0, None
    try:
        try:
            g, rest = go_parse(argv, GLOBAL_FLAGS, GLOBAL_ALIASES)
        except UsageError as exc:
            stdout(f"Incorrect Usage. {exc}\n\n" + help_text("buildctl_help.txt"))
            raise BuildctlError(str(exc)) from None
        g.setdefault("addr", os.environ.get("BUILDKIT_HOST") or "unix:///run/buildkit/buildkitd.sock")
        if g.get("help"):
            stdout(help_text("buildctl_help.txt"))
            return 0
        if g.get("version"):
            stdout(R.fixture_text("version/buildctl_version.txt"))
            return 0
        if g.get("log-format", "text") not in ("json", "text", ""):
            raise BuildctlError(f"unsupported log type {go_quote(g['log-format'])}")
        if not rest or rest[0] in ("help", "h"):
            stdout(help_text("buildctl_help.txt"))
            return 0
        if rest[0] in ("build", "b"):
            rc = cmd_build(g, rest[1:], rec)
        elif rest[0] == "debug":
            rc = cmd_debug(g, rest[1:], rec)
        elif rest[0] in ("du", "prune", "prune-histories", "dial-stdio"):
            raise BuildctlError(f"stand-in: command {rest[0]!r} is not imitated", rc=2)
        else:
            sys.stderr.write(f"No help topic for '{rest[0]}'\n")
            return 3
    except BuildctlError as exc:
        outcome, rc, error = "failed", exc.rc, str(exc)
        if isinstance(exc, D.Refused):
            rec["daemon_outcome"] = "refused"
        elif isinstance(exc, D.DaemonGone):
            rec["daemon_outcome"] = "goaway"
        R.write_err(f"error: {exc}\n")
    except (Interrupted, KeyboardInterrupt):
        outcome, rc, error = "killed", 1, CANCELED
        R.write_err(f"error: {CANCELED}\n")
    finally:
        R.log_event({"event": "end", "pid": rec["pid"], "argv": rec["argv"], "started": rec["started"],
                     "ended": time.time(), "outcome": outcome, "rc": rc, "key": rec["key"],
                     "error": error, "attempt": rec.get("attempt")})  # fmt: skip
        daemon = rec.get("daemon")
        if daemon is not None:
            daemon.log({"cmd": rec["cmd"], "t": rec["started"], "pid": rec["pid"],
                        "key": rec.get("cache_key"), "outcome": rec.get("daemon_outcome", outcome),
                        "variant": rec.get("variant"), "rc": rc})  # fmt: skip
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
