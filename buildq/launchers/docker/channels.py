"""One build inside a runner container (:mod:`.containers`), over the fifo or the exec channel.

Both stream buildctl's stderr as it arrives, give buildctl's exit status (137 after a kill), read
the metadata file, kill only that build's buildctl, and on ``close()`` kill a build still running
and hand the container back (``on_close``). A container that ends under a running build makes
``wait()`` raise ``TransientBuildError(reason="docker_error")``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ...errors import TransientBuildError
from ..base import RunningBuild
from .plan import BoxSpec, parse_exec_output, split_lines

OnClose = Callable[[], None]
#: how long a build may go without its runner having started buildctl before the engine is asked
#: whether the container still runs
SILENCE_CHECK_S = 2.0
CLOSE_WAIT_S = 10.0


class ContainerGone(Exception):
    """The runner container has ended; the build can be started again in a new one."""


class Runner(Protocol):
    """What a build asks of the runner container it runs in (:class:`.containers.RunnerContainer`,
    which starts the build: so this module never imports that one)."""

    spec: BoxSpec
    #: set by a build that finds the container ended under it
    dead: bool

    def running(self) -> bool: ...

    def kill_run(self, run: str) -> None: ...

    def exec_inspect(self, exec_id: str) -> dict[str, Any]: ...


class ChannelBuild(RunningBuild):
    """What both channels share: one reader of stderr, ``wait`` on its end, close once."""

    def __init__(self, box: Runner, run: str, on_close: OnClose) -> None:
        self.box, self.run = box, run
        self._on_close = on_close
        self._lock = threading.Lock()
        self._eof = threading.Event()
        self._reading = False
        self._closed = False
        self._exit: int | None = None

    def _chunks(self) -> Iterator[bytes]:
        raise NotImplementedError

    def _exit_status(self) -> int | None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def lines(self) -> Iterator[str]:
        with self._lock:
            if self._reading or self._eof.is_set():
                return
            self._reading = True
        try:
            yield from split_lines(self._chunks())
            self._eof.set()
        finally:
            with self._lock:
                self._reading = False

    def wait(self, timeout: float | None = None) -> int:
        if not self._eof.is_set():
            with self._lock:
                drain = not self._reading
            if drain:  # nobody reads stderr: read it here, or buildctl blocks on a full pipe
                threading.Thread(target=lambda: list(self.lines()), daemon=True).start()
            if not self._eof.wait(timeout):
                raise TimeoutError(f"buildctl still running after {timeout}s")
        if self._exit is None:
            self._exit = self._exit_status()
            if self._exit is None:
                self.box.dead = True
                raise TransientBuildError(
                    f"the buildctl container {self.box.spec.name} ended during the build",
                    reason="docker_error",
                )
        return self._exit

    def kill(self) -> None:
        with self._lock:
            if self._closed or self._eof.is_set():
                return
        self.box.kill_run(self.run)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if not self._eof.is_set():
                self.box.kill_run(self.run)
                try:
                    self.wait(CLOSE_WAIT_S)
                except (TimeoutError, TransientBuildError):
                    pass
        finally:
            self._release()
            self._on_close()


class FifoBuild(ChannelBuild):
    """A build started with a line on ``ctl``; stderr through the FIFO ``b/<run>/err``."""

    def __init__(self, box: Runner, run: str, where: str, err_fd: int, on_close: OnClose) -> None:
        super().__init__(box, run, on_close)
        self.where = where
        self._fd = err_fd

    def _chunks(self) -> Iterator[bytes]:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        since = time.monotonic()
        while True:
            if not poller.poll(1000):
                started = os.path.exists(f"{self.where}/pid")  # then the runner holds err open
                if not started and time.monotonic() - since > SILENCE_CHECK_S and not self.box.running():
                    return
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return  # every writer closed: buildctl and its runner have ended
            yield data

    def _exit_status(self) -> int | None:
        try:
            with open(f"{self.where}/rc", encoding="ascii") as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None  # the runner never wrote it: the container ended

    def read_metadata(self) -> dict[str, Any] | None:
        try:
            with open(f"{self.where}/metadata.json", encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _release(self) -> None:
        os.close(self._fd)
        shutil.rmtree(self.where, ignore_errors=True)


class ExecBuild(ChannelBuild):
    """A build run by one ``docker exec``: stderr streamed, status and metadata on stdout."""

    def __init__(self, box: Runner, run: str, exec_id: str, sock: Any, on_close: OnClose) -> None:
        super().__init__(box, run, on_close)
        self.exec_id = exec_id
        self._sock = sock
        self._stdout = b""

    def _chunks(self) -> Iterator[bytes]:
        from docker.utils.socket import STDERR, STDOUT, frames_iter

        try:
            for stream, data in frames_iter(self._sock, tty=False):
                if stream == STDERR:
                    yield data
                elif stream == STDOUT:
                    self._stdout += data
        except Exception:  # noqa: BLE001 - the connection broke: the stream ends here
            return

    def _exit_status(self) -> int | None:
        status, _ = parse_exec_output(self._stdout)
        if status is not None:
            return status
        try:  # no status printed: the runner was killed, or its container ended
            info = self.box.exec_inspect(self.exec_id)
        except Exception:  # noqa: BLE001
            return None
        code = info.get("ExitCode")
        return None if info.get("Running") or code is None or not self.box.running() else int(code)

    def read_metadata(self) -> dict[str, Any] | None:
        return parse_exec_output(self._stdout)[1]

    def _release(self) -> None:
        hangup(self._sock)


def hangup(sock: Any) -> None:
    """Close a hijacked engine connection for good (an attached container sees its stdin end)."""
    raw = getattr(sock, "_sock", sock)
    for close in (lambda: raw.shutdown(socket.SHUT_RDWR), sock.close, raw.close):
        try:
            close()
        except OSError:
            pass
