"""Genuine BuildKit v0.21.0 for the opt-in ``buildkit`` tests: a buildkitd and a registry of their own.

``BUILDQ_TEST_BUILDKIT_BIN`` names a folder holding ``buildctl`` and ``buildkitd`` built from the
v0.21.0 source (docs/development.md); the tests are skipped, saying why, when it is unset. They
need root (buildkitd's OCI worker), Debian's ``runc``, ``docker-registry`` and ``busybox-static``.
Everything runs on loopback ports of its own, under the test's temporary folder, and only the
processes started here are stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.harness import free_port

BIN_ENV = "BUILDQ_TEST_BUILDKIT_BIN"


def bin_dir() -> Path | None:
    value = os.environ.get(BIN_ENV)
    return Path(value) if value else None


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout:g}s")


class Registry:
    """Debian's ``docker-registry`` (distribution 2.8) on a loopback port, storage under ``root``."""

    def __init__(self, root: Path, extra_config: str = "") -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\nhttp:\n  addr: {self.host}\n"
            + extra_config
        )
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=open(root / "registry.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        _wait(self._answers, "docker-registry")

    def _answers(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).read()
            return True
        except urllib.error.HTTPError:
            return True  # 401: it answers, and asks for credentials
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Daemon:
    """One buildkitd (OCI worker, runc) on ``tcp://127.0.0.1:<port>`` with its own root folder."""

    def __init__(self, bins: Path, root: Path, registry: Registry) -> None:
        self.bins, self.root = bins, root
        self.port = free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "buildkitd.toml"
        self.config.write_text(f'[registry."{registry.host}"]\n  http = true\n  insecure = true\n')
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.root / "buildkitd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(self.bins / "buildkitd"), "--oci-worker=true", "--containerd-worker=false",
                "--root", str(self.root / "state"), "--addr", self.addr, "--config", str(self.config),
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait(self.answers, f"buildkitd at {self.addr}")

    def answers(self) -> bool:
        out = subprocess.run(
            [str(self.bins / "buildctl"), "--addr", self.addr, "debug", "workers"],
            capture_output=True,
            timeout=10,
        )
        return out.returncode == 0

    def stop(self, kill_after_s: float = 2.0) -> None:
        """SIGTERM, SIGKILL after ``kill_after_s`` if still alive (a rolling update, a crashed pod)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        state = str(self.root / "state")
        with open("/proc/mounts") as fh:
            mounts = [line.split()[1] for line in fh if state in line.split()[1]]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)


def busybox_base(bins: Path, daemon: Daemon, registry: Registry, work: Path) -> str:
    """Push a busybox image (the only base the tests need) to ``registry``; its reference."""
    rootfs = work / "busybox" / "rootfs"
    for sub in ("bin", "etc", "tmp", "root"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    os.chmod(rootfs / "tmp", 0o1777)
    folder = rootfs.parent
    (folder / "Dockerfile").write_text('FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nCMD ["/bin/sh"]\n')
    ref = f"{registry.host}/base/busybox:1"
    subprocess.run(
        [
            str(bins / "buildctl"), "--addr", daemon.addr, "build", "--frontend", "dockerfile.v0",
            "--local", f"context={folder}", "--local", f"dockerfile={folder}",
            "--output", f"type=image,name={ref},push=true,registry.insecure=true",
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return ref
