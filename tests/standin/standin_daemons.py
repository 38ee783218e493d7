"""Simulated BuildKit daemons of the buildctl stand-in (env ``STANDIN_DAEMONS_DIR``).

Each daemon address has a folder ``<dir>/<daemon_slug(addr)>/`` holding:

- ``state.json``: ``{"down_since": t|null, "down_until": t|null, "goaway": bool}`` (epoch seconds,
  written atomically by tests through ``scenarios.daemon_down``/``daemon_up``). The daemon is
  down while ``now < down_until``: new invocations are refused. A build that was running when
  the outage began (``down_since`` after its start) dies with the genuine GOAWAY error when
  ``goaway`` is true; when false the daemon drains and running builds finish.
- ``invocations.log``: one JSON line per invocation that dialled the daemon (``O_APPEND``).
- ``built/<key>``: the daemon's local cache holds build ``key`` (→ the warm capture).
- ``exported/<ref>``: this daemon exported registry cache ``ref`` (→ regwarm on the others).

Stdlib only (os, time): imported at every start of the stand-in.
"""

from __future__ import annotations

import os
import time

try:
    from . import standin_replay as R
    from .standin_checks import BuildctlError
except ImportError:  # run from the stand-in's folder (see buildctl_standin.py)
    import standin_replay as R  # type: ignore[no-redef]
    from standin_checks import BuildctlError  # type: ignore[no-redef]

STATE = "state.json"
LOG = "invocations.log"
DIALS = "dials.log"  # one line per invocation that reached the daemon, written as it dials


def daemon_slug(addr: str) -> str:
    """Folder name of the daemon at ``addr``: ``tcp://127.0.0.1:1234`` → ``tcp___127.0.0.1_1234``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in addr)


class DaemonGone(BuildctlError):
    """The daemon stopped (GOAWAY) while this build was running."""


class Refused(BuildctlError):
    """The daemon was down when this invocation dialled it."""


class Daemon:
    """The simulated daemon at ``addr`` whose state lives under ``root``."""

    def __init__(self, root: str, addr: str) -> None:
        self.root, self.addr = root, addr
        self.dir = os.path.join(root, daemon_slug(addr))
        self.started = time.time()
        self._polled = 0.0

    def state(self) -> dict:
        try:
            with open(os.path.join(self.dir, STATE), encoding="utf-8") as f:
                st = R.loads(f.read())
        except (OSError, ValueError):
            return {}
        return st if isinstance(st, dict) else {}

    def is_down(self, now: float | None = None) -> bool:
        until = self.state().get("down_until")
        return until is not None and (time.time() if now is None else now) < until

    def dial(self, cmd: str, what: str = "listing workers for Build: ") -> None:
        """Raise :class:`Refused` (buildctl's connection-refused text) while the daemon is down;
        else note the dial in ``dials.log``."""
        self.started = time.time()
        if self.is_down(self.started):
            raise Refused(R.refused_text(self.addr, what=what))
        self.log({"cmd": cmd, "pid": os.getpid(), "t": self.started}, name=DIALS)

    def watch(self) -> None:
        """Raise :class:`DaemonGone` once a GOAWAY outage began during this build (polls ≤ every POLL_S)."""
        mono = time.monotonic()
        if mono - self._polled < R.POLL_S:
            return
        self._polled = mono
        st = self.state()
        since = st.get("down_since")
        if since is not None and st.get("goaway", True) and self.started <= since <= time.time():
            raise DaemonGone(R.capture_error(R.GOAWAY_CAPTURE))

    # ---- local cache and registry cache ------------------------------------------------------

    def _mark(self, kind: str, key: str) -> None:
        folder = os.path.join(self.dir, kind)
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(os.path.join(folder, R.safe_name(key)), os.O_CREAT | os.O_WRONLY, 0o644))

    def record_built(self, key: str) -> None:
        self._mark("built", key)

    def record_exported(self, ref: str) -> None:
        self._mark("exported", ref)

    def has_built(self, key: str) -> bool:
        return os.path.exists(os.path.join(self.dir, "built", R.safe_name(key)))

    def registry_has(self, ref: str) -> bool:
        """Some daemon of this folder exported registry cache ``ref``."""
        name = R.safe_name(ref)
        try:
            folders = os.listdir(self.root)
        except OSError:
            return False
        return any(os.path.exists(os.path.join(self.root, d, "exported", name)) for d in folders)

    def variant(self, key: str | None, import_refs: list[str]) -> str:
        """``warm`` (built here before), ``regwarm`` (an imported ref is in the registry), else ``cold``."""
        if key and self.has_built(key):
            return "warm"
        if any(self.registry_has(ref) for ref in import_refs):
            return "regwarm"
        return "cold"

    # ---- invocation log ------------------------------------------------------------------------

    def log(self, record: dict, name: str = LOG) -> None:
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (R.dumps(record) + "\n").encode())
        finally:
            os.close(fd)


def daemon_for(addr: str) -> Daemon | None:
    """The simulated daemon at ``addr`` when ``STANDIN_DAEMONS_DIR`` is set, else None."""
    root = os.environ.get("STANDIN_DAEMONS_DIR")
    return Daemon(root, addr) if root else None
