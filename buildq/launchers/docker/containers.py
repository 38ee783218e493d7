"""The docker launcher's containers: the engine client, runner containers, the warm slot.

**The engine.** :class:`Engine` makes the docker SDK clients on first use (the SDK is imported
only when the first build starts, not at import). Errors when starting: engine unreachable →
``TransientBuildError(reason="docker_unavailable")``; image missing and not pullable →
``PermanentBuildError(reason="image_pull_failed")``; the engine refusing the container (4xx) →
``PermanentBuildError(reason="docker_rejected")``; other engine errors (5xx) →
``TransientBuildError(reason="docker_error")``.

**Runner containers**, idle until they are given builds. A runner container runs ``runner.sh
serve`` as its entrypoint with stdin attached by the worker process (when that process ends,
stdin closes and the container ends with it). Builds reach it over one of two channels
(:mod:`.channels`), both with ``/buildq/run`` inside the container:

- ``fifo`` (the fast one): ``/buildq/run`` is a bind mount of a worker-side folder (by default in
  ``/dev/shm``); a build is a ``cmd`` file and an ``err`` FIFO in ``b/<run>/`` and one line on the
  ``ctl`` FIFO. It needs the worker and the engine to share that folder (worker on the engine's
  host); :func:`open_runner` checks that with a token the container must echo back.
- ``exec``: ``/buildq/run`` is a tmpfs; each build is one ``docker exec`` (stderr streamed, secret
  files as a tar on its stdin, exit status and metadata file on its stdout).

**The warm slot**: the worker process's warm runner container, and who owns a warm container.
:class:`WarmSlot` makes the container on first use, shares it between the process's builds and
replaces it when it has ended, when ``BUILDQ_BUILDCTL_IMAGE`` now names another image (checked
at most every ``IMAGE_RECHECK_S``, on an injected clock), or in a forked child (which never
touches its parent's container). A replaced container is removed once its last build closes.
Settings cannot change under a container: each worker process makes its own from its settings.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ...errors import PermanentBuildError, TransientBuildError
from ..base import RunningBuild
from .channels import ContainerGone, ExecBuild, FifoBuild, OnClose, hangup
from .plan import RUN_DIR, WORKER_LABEL, WORKER_STARTED_LABEL, BoxSpec, command_file, run_dir, secrets_tar

if TYPE_CHECKING:
    from ...config import Settings

log = logging.getLogger("buildq.launchers.docker")

Channel = Literal["fifo", "exec"]
CONTROL_TIMEOUT_S = 60
READY_TIMEOUT_S = 5.0
IMAGE_RECHECK_S = 30.0


# -- the engine ------------------------------------------------------------------------------


def is_unreachable(exc: BaseException) -> bool:
    import docker.errors
    import requests.exceptions

    if isinstance(exc, requests.exceptions.ConnectionError):
        return True
    return isinstance(exc, docker.errors.DockerException) and not isinstance(exc, docker.errors.APIError)


def unreachable(exc: BaseException, where: str) -> TransientBuildError:
    """The engine at ``where`` did not answer: transient."""
    return TransientBuildError(f"Docker engine unreachable at {where}: {exc}", reason="docker_unavailable")


def start_error(exc: Exception, image: str, where: str) -> Exception:
    """The BuildError for an engine error while creating or starting a buildctl container."""
    import docker.errors

    if isinstance(exc, TransientBuildError | PermanentBuildError):
        return exc
    if is_unreachable(exc):
        return unreachable(exc, where)
    if isinstance(exc, docker.errors.APIError) and exc.is_client_error():
        return PermanentBuildError(
            f"Docker engine refused the buildctl container ({image}): {exc.explanation or exc}",
            reason="docker_rejected",
        )
    return TransientBuildError(
        f"Docker engine error starting buildctl ({image}): {exc}", reason="docker_error"
    )


class Engine:
    """Clients for the engine at ``settings.docker_url`` (or DOCKER_HOST), made on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = settings.docker_url or "DOCKER_HOST"
        self._lock = threading.Lock()
        self._api: Any = None
        self._stream_api: Any = None

    def _new_client(self, timeout: float | None, version: str = "auto") -> Any:
        import docker

        kwargs: dict[str, Any] = {"version": version, "timeout": timeout}
        if self.settings.docker_url:
            kwargs["base_url"] = self.settings.docker_url
        else:
            kwargs.update(docker.utils.kwargs_from_env())
        return docker.APIClient(**kwargs)

    def api(self) -> Any:
        """The control client (60 s request timeout); TransientBuildError if the engine is down."""
        with self._lock:
            if self._api is None:
                try:
                    self._api = self._new_client(CONTROL_TIMEOUT_S)
                except Exception as exc:
                    if is_unreachable(exc):
                        raise unreachable(exc, self.where) from exc
                    raise
            return self._api

    def stream_api(self) -> Any:
        """A second client without request timeout, for streams (exec output, stdin attach)."""
        api = self.api()
        with self._lock:
            if self._stream_api is None:
                self._stream_api = self._new_client(None, version=api.api_version)
            return self._stream_api

    def start_error(self, exc: Exception, image: str) -> Exception:
        return start_error(exc, image, self.where)

    def image_id(self, image: str) -> str | None:
        """The id of ``image`` on the engine, None when it is not there."""
        import docker.errors

        try:
            return str(self.api().inspect_image(image)["Id"])
        except docker.errors.ImageNotFound:
            return None

    def ensure_image(self, image: str) -> str:
        """Pull ``image`` unless present; return its id. PermanentBuildError(image_pull_failed)."""
        found = self.image_id(image)
        if found is not None:
            return found
        api = self.api()
        deadline = time.monotonic() + self.settings.docker_pull_timeout_s
        try:
            puller = self._new_client(self.settings.docker_pull_timeout_s, version=api.api_version)
            for event in puller.pull(image, stream=True, decode=True):
                if isinstance(event, dict) and event.get("error"):
                    raise RuntimeError(event["error"])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pull took longer than {self.settings.docker_pull_timeout_s:g}s")
            return str(api.inspect_image(image)["Id"])
        except Exception as exc:
            if is_unreachable(exc) and time.monotonic() < deadline:
                raise  # the engine itself is gone: transient, not the image's fault
            raise PermanentBuildError(
                f"cannot pull buildctl image {image!r} (BUILDQ_BUILDCTL_IMAGE): {exc}",
                reason="image_pull_failed",
            ) from exc


# -- runner containers -----------------------------------------------------------------------


@cache
def runner_script() -> str:
    """``runner.sh`` without its comment lines (it travels in every container's argv)."""
    text = Path(__file__).with_name("runner.sh").read_text()
    return "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#"))


def runner_argv(*args: str) -> list[str]:
    return ["/bin/sh", "-c", runner_script(), "buildq-runner", *args]


class NotShared(Exception):
    """The container does not see the worker's folder: the fifo channel cannot be used."""


def exec_runner(api: Any, container_id: str, *args: str) -> tuple[str, bytes]:
    """Run ``runner.sh ARGS`` in the container and wait for it (the ``kill`` and ``list``
    commands); the exec's id (for its exit status) and its stdout."""
    exec_id = api.exec_create(container_id, runner_argv(*args), stdout=True, stderr=False)["Id"]
    out = api.exec_start(exec_id)
    return exec_id, out if isinstance(out, bytes) else b""


class RunnerContainer:
    """A started runner container and its channel; ``refs`` counts the builds using it."""

    def __init__(self, engine: Engine, spec: BoxSpec, container_id: str, image_id: str) -> None:
        self.engine, self.spec, self.id, self.image_id = engine, spec, container_id, image_id
        self.channel: Channel = "exec"
        self.host_dir: str | None = None
        self.ctl: int | None = None
        self.attach: Any = None
        self.pid = os.getpid()
        self.refs = 0
        self.dead = False
        self.closed = False

    def running(self) -> bool:
        try:
            return bool(self.engine.api().inspect_container(self.id)["State"]["Running"])
        except Exception:  # noqa: BLE001 - gone, or the engine is: not running for us
            return False

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        """The engine's view of exec ``exec_id`` in this container (``Running``, ``ExitCode``)."""
        return self.engine.api().exec_inspect(exec_id)

    def start_build(
        self, run: str, argv: list[str], env: dict[str, str], files: dict[str, bytes], on_close: OnClose
    ) -> RunningBuild:
        """Start buildctl ``argv`` as build ``run``; ContainerGone when the container has ended."""
        if self.channel == "fifo":
            return self._start_fifo(run, argv, env, files, on_close)
        return self._start_exec(run, argv, env, files, on_close)

    def _start_fifo(
        self, run: str, argv: list[str], env: dict[str, str], files: dict[str, bytes], on_close: OnClose
    ) -> RunningBuild:
        assert self.host_dir is not None
        where = run_dir(run, self.host_dir)
        os.mkdir(where, 0o700)
        try:
            for name, data in {"cmd": command_file(argv, env), **files}.items():
                fd = os.open(f"{where}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            os.mkfifo(f"{where}/err", 0o600)
            err = os.open(f"{where}/err", os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            shutil.rmtree(where, ignore_errors=True)
            raise
        try:
            self.send(f"run {run}\n")
        except BaseException:
            os.close(err)
            shutil.rmtree(where, ignore_errors=True)
            raise
        return FifoBuild(self, run, where, err, on_close)

    def _start_exec(
        self, run: str, argv: list[str], env: dict[str, str], files: dict[str, bytes], on_close: OnClose
    ) -> RunningBuild:
        import docker.errors

        api = self.engine.stream_api()
        try:
            exec_id = api.exec_create(
                self.id, runner_argv("exec", run, "1" if files else "0", *argv),
                stdin=bool(files), stdout=True, stderr=True, environment=env,
            )["Id"]  # fmt: skip
            sock = api.exec_start(exec_id, socket=True)
        except docker.errors.APIError as exc:
            if exc.status_code in (404, 409):  # removed, or not running
                self.dead = True
                raise ContainerGone(str(exc)) from exc
            raise self.engine.start_error(exc, self.spec.image) from exc
        except Exception as exc:
            raise self.engine.start_error(exc, self.spec.image) from exc
        if files:
            raw = getattr(sock, "_sock", sock)
            try:
                raw.sendall(secrets_tar(files))
                raw.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the exec ended already: its output says why
        return ExecBuild(self, run, exec_id, sock, on_close)

    def send(self, line: str) -> None:
        """Write one request line to the ``ctl`` FIFO (ContainerGone when nobody reads it)."""
        try:
            if self.ctl is None:
                raise BrokenPipeError("closed")
            os.write(self.ctl, line.encode())
        except OSError as exc:  # EPIPE: the runner, and so the container, has ended
            self.dead = True
            raise ContainerGone(f"runner container {self.spec.name} has ended") from exc

    def kill_run(self, run: str) -> None:
        """Kill build ``run``'s buildctl inside the container (never the container)."""
        if self.channel == "fifo":
            try:
                self.send(f"kill {run}\n")
            except ContainerGone:
                pass
            return
        try:
            exec_runner(self.engine.stream_api(), self.id, "kill", run)
        except Exception:  # noqa: BLE001 - the container is gone: so is the build
            pass

    def close(self) -> None:
        """Remove the container (and its builds) and the worker-side folder. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.attach is not None:
            hangup(self.attach)
        ctl, self.ctl = self.ctl, None
        if ctl is not None:
            os.close(ctl)
        try:
            self.engine.api().remove_container(self.id, v=True, force=True)
        except Exception:  # noqa: BLE001 - gone already, or the engine is: the reaper catches leftovers
            pass
        if self.host_dir is not None:
            shutil.rmtree(self.host_dir, ignore_errors=True)


def open_runner(engine: Engine, spec: BoxSpec, *, channel: str, state_dir: str) -> RunnerContainer:
    """Create and start a runner container; the fifo channel when ``channel`` allows and it works."""
    image_id = engine.ensure_image(spec.image)
    if channel in ("auto", "fifo"):
        try:
            return _open(engine, spec, image_id, os.path.join(state_dir, spec.name))
        except NotShared as exc:
            if channel == "fifo":
                message = f"the fifo channel cannot be used: {exc}"
                raise PermanentBuildError(message, reason="docker_rejected") from exc
            log.info("docker launcher: exec channel (%s)", exc)
            # a new name: the engine may still be removing the first container under the old one
            spec = replace(spec, name=spec.name + "-x")
    return _open(engine, spec, image_id, None)


def _open(engine: Engine, spec: BoxSpec, image_id: str, host_dir: str | None) -> RunnerContainer:
    import docker.errors
    import docker.types

    api = engine.api()
    mounts = [docker.types.Mount(dst, src, type="bind", read_only=True) for src, dst in spec.binds]
    token = secrets.token_hex(16)
    ready = -1
    if host_dir is not None:
        try:
            ready = _shared_folder(host_dir, token)
        except OSError as exc:
            shutil.rmtree(host_dir, ignore_errors=True)
            raise NotShared(f"cannot prepare {host_dir}: {exc}") from exc
        mounts.append(docker.types.Mount(RUN_DIR, host_dir, type="bind"))
    tmpfs = None if host_dir is not None else {RUN_DIR: "mode=0700"}
    box: RunnerContainer | None = None
    try:
        host_config = api.create_host_config(
            mounts=mounts, tmpfs=tmpfs, network_mode=spec.network, auto_remove=spec.auto_remove
        )
        try:
            created = api.create_container(
                spec.image, entrypoint=runner_argv("serve"), stdin_open=True, labels=spec.labels,
                host_config=host_config, name=spec.name,
            )  # fmt: skip
        except docker.errors.APIError as exc:
            if host_dir is not None and exc.is_client_error() and host_dir in str(exc.explanation or exc):
                raise NotShared(f"the engine cannot mount {host_dir}: {exc.explanation}") from exc
            raise
        box = RunnerContainer(engine, spec, created["Id"], image_id)
        box.attach = engine.stream_api().attach_socket(box.id, params={"stdin": 1, "stream": 1})
        api.start(box.id)
        if host_dir is not None:
            box.host_dir = host_dir
            if _read_ready(ready, READY_TIMEOUT_S) != token:
                raise NotShared(f"the container does not see {host_dir} (worker not on the engine's host)")
            box.channel = "fifo"
            box.ctl = os.open(f"{host_dir}/ctl", os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(box.ctl, True)
        return box
    except BaseException as exc:
        if box is not None:
            box.close()
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)
        if isinstance(exc, NotShared | PermanentBuildError) or not isinstance(exc, Exception):
            raise
        raise engine.start_error(exc, spec.image) from exc
    finally:
        if ready >= 0:
            os.close(ready)


def _shared_folder(host_dir: str, token: str) -> int:
    """Make the worker-side folder (``b/``, FIFOs ``ctl`` and ``ready``, the token); return the
    read end of ``ready``, opened before the container starts."""
    os.makedirs(f"{host_dir}/b", mode=0o700)
    os.chmod(host_dir, 0o700)
    os.mkfifo(f"{host_dir}/ctl", 0o600)
    os.mkfifo(f"{host_dir}/ready", 0o600)
    with open(f"{host_dir}/token", "w", encoding="ascii") as fh:
        fh.write(token + "\n")
    return os.open(f"{host_dir}/ready", os.O_RDONLY | os.O_NONBLOCK)


def _read_ready(fd: int, timeout_s: float) -> str:
    """What the container wrote to the ``ready`` FIFO within ``timeout_s`` ('' for nothing)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    got = b""
    while b"\n" not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        got += chunk
    return got.decode("ascii", "replace").strip()


# -- the warm slot ---------------------------------------------------------------------------


class WarmSlot:
    """Holds the current warm container; ``acquire``/``release`` bracket each build."""

    def __init__(
        self,
        make: Callable[[], RunnerContainer],
        image_id: Callable[[], str | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = IMAGE_RECHECK_S,
    ) -> None:
        self._make, self._image_id, self._clock, self._recheck_s = make, image_id, clock, recheck_s
        self._lock = threading.Lock()
        self.box: RunnerContainer | None = None
        self._checked = 0.0
        self._atexit = False

    def acquire(self) -> RunnerContainer:
        with self._lock:
            box = self.box
            if box is not None and (box.dead or box.pid != os.getpid() or self._image_changed(box)):
                self._retire(box)
                box = None
            if box is None:
                box = self.box = self._make()
                self._checked = self._clock()
                if not self._atexit:
                    atexit.register(self.close)
                    self._atexit = True
            box.refs += 1
            return box

    def release(self, box: RunnerContainer) -> None:
        with self._lock:
            box.refs -= 1
            if box is not self.box and box.refs <= 0 and box.pid == os.getpid():
                box.close()

    def close(self) -> None:
        """Remove this process's warm container (with any build still in it)."""
        with self._lock:
            box, self.box = self.box, None
            if box is not None and box.pid == os.getpid():
                box.close()

    def _image_changed(self, box: RunnerContainer) -> bool:
        now = self._clock()
        if now - self._checked < self._recheck_s:
            return False
        self._checked = now
        try:
            current = self._image_id()
        except Exception:  # noqa: BLE001 - the engine is down: the build will say so itself
            return False
        return current is not None and current != box.image_id

    def _retire(self, box: RunnerContainer) -> None:
        self.box = None
        if box.pid != os.getpid():
            return  # the parent's container (we are a forked child): not ours to close
        if box.refs <= 0:
            box.close()


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def worker_labels() -> dict[str, str]:
    """``buildq.worker=<hostname>:<pid>`` and the process's start time (pid reuse is told apart)."""
    pid = os.getpid()
    return {WORKER_LABEL: f"{socket.gethostname()}:{pid}", WORKER_STARTED_LABEL: process_started(pid) or ""}


def worker_gone(labels: Mapping[str, str], hostname: str | None = None) -> bool:
    """True when a warm container's worker process ran on this host and is no longer there."""
    host, _, pid = labels.get(WORKER_LABEL, "").rpartition(":")
    if host != (hostname or socket.gethostname()) or not pid.isdigit():
        return False  # another host's (or unlabelled): its own reaper decides
    started = process_started(int(pid))
    return started is None or started != labels.get(WORKER_STARTED_LABEL)
