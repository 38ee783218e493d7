"""The ``local`` launcher: ``BUILDQ_BUILDCTL_PATH`` as a subprocess of the worker.

buildctl runs in its own process group (so a kill reaches anything it spawned), with the
worker's environment plus ``spec.env`` (``BUILDKIT_HOST``, secret variables). The metadata file
goes to a per-process scratch directory; ``close()`` removes it. Orphans are found through pid
files that name the job and the process group. Both live in the state directory, by default
``/dev/shm/buildq-local`` (memory: creating a file there costs a tenth of what it costs on a
disk-backed /tmp, and a build creates two), else ``<tmp>/buildq-local``.

The state directory must be the worker's own (:func:`private_folder`: a real directory owned by the
worker's user, writable by nobody else; the worker refuses to start otherwise), and pid files are
created with ``O_EXCL | O_NOFOLLOW``: a symlink planted there is never followed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import PermanentBuildError, SettingsError
from .base import BuildPaths, Launcher, LaunchSpec, RunningBuild


class LocalBuild(RunningBuild):
    def __init__(self, proc: subprocess.Popen[bytes], paths: BuildPaths, pidfile: Path | None) -> None:
        self._proc = proc
        self._paths = paths
        self._pidfile = pidfile
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def lines(self) -> Iterator[str]:
        stream = self._proc.stderr
        assert stream is not None
        for raw in iter(stream.readline, b""):
            yield raw.decode("utf-8", "replace").rstrip("\r\n")

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"buildctl still running after {timeout}s") from exc

    def kill(self) -> None:
        with self._lock:
            if self._proc.poll() is not None:
                return
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    self._proc.kill()
                except ProcessLookupError:
                    pass

    def read_metadata(self) -> dict[str, Any] | None:
        try:
            with open(self._paths.metadata_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def finish(self) -> tuple[int, dict[str, Any] | None]:
        try:
            code = self.wait()
            return code, self.read_metadata() if code == 0 else None
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._proc.poll() is None:
            self.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        if self._pidfile is not None:
            self._pidfile.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.unlink(self._paths.metadata_file)


class LocalLauncher(Launcher):
    """Runs buildctl as a local subprocess."""

    name = "local"

    def __init__(self, buildctl_path: str, *, state_dir: str | None = None, deployment: str = "") -> None:
        self.buildctl_path = buildctl_path
        self.state_dir = Path(state_dir or default_state_dir())
        #: written into every pid file: a worker reaps only its own deployment's leftovers
        self.deployment = deployment
        self._scratch: str | None = None
        self._scratch_pid = 0
        self._count = 0
        self._base_env: dict[bytes, bytes] | None = None

    def prepare(
        self, job_id: str, context_dir: str | None, dockerfile_dir: str | None, secret_ids: Sequence[str] = ()
    ) -> BuildPaths:
        # one private scratch directory per process, made once; one metadata file per build in it
        if self._scratch is None or self._scratch_pid != os.getpid():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._scratch = tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=self.state_dir)
            self._scratch_pid = os.getpid()
        self._count += 1
        return BuildPaths(
            context_dir=context_dir,
            dockerfile_dir=dockerfile_dir,
            metadata_file=os.path.join(self._scratch, f"{job_id}.{self._count}.metadata.json"),
        )

    def start(self, spec: LaunchSpec, paths: BuildPaths) -> RunningBuild:
        if self._base_env is None:  # the worker's environment, read once (as bytes: no re-encoding)
            self._base_env = dict(os.environb)
        env = self._base_env.copy()
        env.update((os.fsencode(k), os.fsencode(v)) for k, v in spec.env.items())
        try:
            proc = subprocess.Popen(
                [self.buildctl_path, *spec.argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise PermanentBuildError(
                f"cannot run buildctl at {self.buildctl_path!r} (BUILDQ_BUILDCTL_PATH): "
                f"{exc.strerror or exc}",
                reason="buildctl_missing",
            ) from exc
        return LocalBuild(proc, paths, self._write_pidfile(spec.job_id, proc.pid, spec.gen))

    def _write_pidfile(self, job_id: str, pid: int, gen: int = 0) -> Path | None:
        path = f"{self.state_dir}/{job_id}.{pid}.pid"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:  # first build, or the directory was cleaned away
                private_folder(self.state_dir, "BUILDQ_LOCAL_STATE_DIR")
                fd = os.open(path, flags, 0o600)
            except FileExistsError:  # a dead run's file (its pid reused), or something planted
                os.unlink(path)  # the name only: a symlink goes, never what it points to
                fd = os.open(path, flags, 0o600)
            try:
                info = {
                    "job_id": job_id,
                    "pgid": pid,
                    "exe": self.buildctl_path,
                    "deployment": self.deployment,
                    "gen": gen,
                }
                os.write(fd, json.dumps(info).encode())
            finally:
                os.close(fd)
            return Path(path)
        except OSError:
            return None

    def _pidfiles(self, job_id: str | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        if not self.state_dir.is_dir():
            return
        for path in self.state_dir.glob(f"{glob.escape(job_id)}.*.pid" if job_id else "*.pid"):
            try:
                yield path, json.loads(path.read_text())
            except (OSError, ValueError):
                continue

    def find_orphans(self) -> list[str]:
        """Job ids of this deployment's pid files (another deployment's are not ours to judge)."""
        mine = (info for _, info in self._pidfiles() if info.get("deployment", "") == self.deployment)
        return sorted({str(info.get("job_id")) for info in mine})

    def kill_orphan(self, job_id: str, gen: int | None = None) -> None:
        for path, info in self._pidfiles(job_id):
            if info.get("job_id") != job_id or info.get("deployment", "") != self.deployment:
                continue
            if gen is not None and info.get("gen", 0) != gen:
                continue
            try:
                pgid = int(info["pgid"])
                if _runs(pgid, str(info.get("exe", ""))):  # not a recycled pid of something else
                    os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, KeyError, ValueError):
                pass
            path.unlink(missing_ok=True)

    def reap_scratch(self) -> list[str]:
        """Remove the scratch directories (``run-<pid>-*``) of processes that are gone."""
        removed = []
        for path in self.state_dir.glob("run-*-*") if self.state_dir.is_dir() else ():
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    def close(self) -> None:
        """This process is stopping: remove its scratch directory."""
        if self._scratch is not None and self._scratch_pid == os.getpid():
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def private_folder(folder: str | os.PathLike[str], setting: str) -> None:
    """Make ``folder`` (mode 0700) if it is missing, then check it is this worker's own: a real
    directory (no symlink) owned by the worker's user and writable by no one else. Raise
    :class:`SettingsError` saying what is wrong (the worker does not start)."""
    path = os.fspath(folder)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SettingsError(f"{setting}: cannot make the state folder {path!r}: {exc.strerror}") from None
    info = os.lstat(path)
    why = None
    if stat.S_ISLNK(info.st_mode):
        why = "is a symlink"
    elif not stat.S_ISDIR(info.st_mode):
        why = "is not a directory"
    elif info.st_uid != os.geteuid():
        why = f"is owned by uid {info.st_uid}, not by this worker's uid {os.geteuid()}"
    elif info.st_mode & 0o022:
        why = f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    if why is not None:
        raise SettingsError(
            f"{setting}: the state folder {path!r} {why}; the worker writes its pid files there and "
            "refuses a folder another user could plant files in (remove it, or name another)"
        )


def default_state_dir(shm: str = "/dev/shm", name: str = "buildq-local") -> str:
    """``<shm>/<name>`` when ``shm`` is a writable directory, else ``<tmp>/<name>``."""
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return os.path.join(shm, name)
    return os.path.join(tempfile.gettempdir(), name)


def _runs(pid: int, exe: str, *, settle_s: float = 0.5) -> bool:
    """True when process ``pid`` is alive and was started from ``exe`` (directly, or as the script
    an interpreter runs: then ``exe`` is among the first arguments).

    A process that is still exec'ing (just started) shows an empty command line for a moment: it is
    read again for up to ``settle_s``."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return False
        if raw or time.monotonic() >= deadline:
            return exe.encode() in raw.split(b"\0")[:3]
        time.sleep(0.005)
