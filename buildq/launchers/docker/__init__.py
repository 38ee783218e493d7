"""The ``docker`` launcher: buildctl in containers from ``BUILDQ_BUILDCTL_IMAGE``.

Warm (the default): one runner container per worker process (``containers.WarmSlot``), its
entrypoint replaced by the idle runner script, labelled ``buildq.managed=true``,
``buildq.warm=true`` and ``buildq.worker=<hostname>:<pid>``, with each ``BUILDQ_CONTEXT_ROOTS``
directory bind-mounted read-only at the same path. Each build's buildctl runs inside it, over the
fifo channel when the worker shares a folder with the engine, else one ``docker exec`` per build
(``containers``, ``channels``). Cancel and time limits kill that build's buildctl, never the
container.

One-shot: a build whose context (or Dockerfile folder) lies outside the roots, or every build
with ``BUILDQ_DOCKER_WARM=false``, gets its own runner container labelled
``buildq.job_id=<job>``, with the context at ``/buildq/context`` and the Dockerfile folder at
``/buildq/dockerfile`` (read-only), removed when the build closes.

Secrets reach buildctl as files (``--secret id=…,src=…``) in the build's folder on the shared
``/dev/shm`` folder or the container's tmpfs, removed after the build; never as container
environment. Bind sources are the worker's paths, which the engine resolves on its host.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ...errors import TransientBuildError
from ..base import BuildPaths, Launcher, LaunchSpec, RunningBuild
from ..local import default_state_dir
from .channels import ContainerGone
from .containers import Engine, RunnerContainer, WarmSlot, open_runner, worker_labels
from .plan import (
    CONFIG_LABEL,
    CONTEXT_DIR,
    DEPLOYMENT_LABEL,
    DOCKERFILE_DIR,
    JOB_LABEL,
    MANAGED_LABEL,
    WARM_LABEL,
    BoxSpec,
    container_name,
    metadata_path,
    run_id,
    run_of,
    secret_path,
    warm_name,
    warm_plan,
)
from .reap import find_orphans, kill_orphan

if TYPE_CHECKING:
    from ...config import Settings

log = logging.getLogger("buildq.launchers.docker")


def _real(path: str | None) -> str | None:
    return os.path.realpath(path) if path is not None else None


class DockerLauncher(Launcher):
    """Runs buildctl in containers through the engine at ``settings.docker_url`` (or DOCKER_HOST).

    ``channel``: ``auto`` (fifo when it works, else exec), ``fifo`` or ``exec``; ``state_dir``: the
    worker-side parent of the shared folders (default ``/dev/shm/buildq-docker``).
    """

    name = "docker"

    def __init__(
        self,
        settings: Settings,
        *,
        state_dir: str | None = None,
        channel: str = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        #: written into every container's labels: a worker reaps only its own deployment's
        self.deployment = settings.deployment_id
        self.state_dir = state_dir or default_state_dir(name="buildq-docker")
        self.channel = channel
        self.roots = [os.path.realpath(r) for r in settings.context_roots]
        self.warm = WarmSlot(self._open_warm, self._image_id, clock=clock)
        self._count = 0

    def api(self) -> Any:
        return self.engine.api()

    # -- Launcher --------------------------------------------------------------------------

    def _one_shot_reason(self, context_dir: str | None, dockerfile_dir: str | None) -> str | None:
        warm = self.settings.docker_warm
        return warm_plan(_real(context_dir), _real(dockerfile_dir), self.roots, warm=warm)

    def prepare(
        self, job_id: str, context_dir: str | None, dockerfile_dir: str | None, secret_ids: Sequence[str] = ()
    ) -> BuildPaths:
        self._count += 1
        run = run_id(job_id, self._count)
        if self._one_shot_reason(context_dir, dockerfile_dir) is None:
            context, dockerfile = _real(context_dir), _real(dockerfile_dir)
        else:
            context = CONTEXT_DIR if context_dir else None
            dockerfile = DOCKERFILE_DIR if dockerfile_dir else None
        secrets = tuple((sid, secret_path(run, i)) for i, sid in enumerate(secret_ids))
        return BuildPaths(context, dockerfile, metadata_path(run), secrets)

    def start(self, spec: LaunchSpec, paths: BuildPaths) -> RunningBuild:
        run = run_of(paths.metadata_file)
        files = {posixpath.basename(path): spec.secrets[sid].encode() for sid, path in paths.secret_files}
        env = dict(spec.env)
        reason = self._one_shot_reason(spec.context_dir, spec.dockerfile_dir)
        if reason is None:
            return self._start_warm(run, spec, env, files)
        log.info("job %s runs in a one-shot buildctl container: %s", spec.job_id, reason)
        return self._start_one_shot(run, spec, env, files)

    def _start_warm(
        self, run: str, spec: LaunchSpec, env: dict[str, str], files: dict[str, bytes]
    ) -> RunningBuild:
        for attempt in (1, 2):
            box = self.warm.acquire()
            try:
                return box.start_build(run, list(spec.argv), env, files, partial(self.warm.release, box))
            except ContainerGone as exc:
                self.warm.release(box)
                if attempt == 2:
                    message = f"warm buildctl container ended: {exc}"
                    raise TransientBuildError(message, reason="docker_error") from exc
                log.warning("warm buildctl container %s has ended: starting a new one", box.spec.name)
            except BaseException:
                self.warm.release(box)
                raise
        raise AssertionError("unreachable")

    def _start_one_shot(
        self, run: str, spec: LaunchSpec, env: dict[str, str], files: dict[str, bytes]
    ) -> RunningBuild:
        binds = [(spec.context_dir, CONTEXT_DIR), (spec.dockerfile_dir, DOCKERFILE_DIR)]
        box_spec = BoxSpec(
            self.settings.buildctl_image, container_name(spec.job_id),
            {JOB_LABEL: spec.job_id, MANAGED_LABEL: "true", DEPLOYMENT_LABEL: self.deployment},
            self.settings.docker_network,
            binds=[(source, target) for source, target in binds if source],
        )  # fmt: skip
        box = self._open(box_spec)
        box.refs = 1
        try:
            return box.start_build(run, list(spec.argv), env, files, box.close)
        except ContainerGone as exc:
            box.close()
            message = f"buildctl container ended at once: {exc}"
            raise TransientBuildError(message, reason="docker_error") from exc
        except BaseException:
            box.close()
            raise

    def _open(self, spec: BoxSpec) -> RunnerContainer:
        box = open_runner(self.engine, spec, channel=self.channel, state_dir=self.state_dir)
        if self.channel == "auto" and box.channel == "exec":
            self.channel = "exec"  # learnt once: the fifo channel cannot work from this worker
        return box

    def _open_warm(self) -> RunnerContainer:
        s = self.settings
        config = "\0".join([s.buildctl_image, s.docker_network, *self.roots])
        labels = {
            MANAGED_LABEL: "true",
            WARM_LABEL: "true",
            DEPLOYMENT_LABEL: self.deployment,
            **worker_labels(),
            CONFIG_LABEL: hashlib.sha256(config.encode()).hexdigest()[:16],
        }
        spec = BoxSpec(
            s.buildctl_image, warm_name(socket.gethostname(), os.getpid()), labels, s.docker_network,
            binds=[(root, root) for root in self.roots], auto_remove=True,
        )  # fmt: skip
        return self._open(spec)

    def _image_id(self) -> str | None:
        return self.engine.image_id(self.settings.buildctl_image)

    def close(self) -> None:
        """Remove this process's warm container (tests, benchmarks; a worker's ends with it)."""
        self.warm.close()

    # -- orphans (reap) ----------------------------------------------------------------------

    def find_orphans(self) -> list[str]:
        """Job ids of buildctl runs on the engine: one-shot containers (any state) and builds in
        running warm containers. Also removes the warm containers of worker processes of this host
        that are gone, and worker-side folders whose container has ended."""
        return find_orphans(self.api(), self.state_dir, self.deployment)

    def kill_orphan(self, job_id: str, gen: int | None = None) -> None:
        """Remove ``job_id``'s one-shot containers and kill its builds in warm containers (every
        generation's: a container does not say which claim its build belongs to)."""
        kill_orphan(self.api(), job_id, self.deployment)
