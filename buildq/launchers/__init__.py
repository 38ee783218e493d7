"""Launchers: where a buildctl invocation runs. One small interface (``base.Launcher``), one file each.

- ``local``: buildctl as a subprocess of the worker (``BUILDQ_BUILDCTL_PATH``).
- ``docker``: buildctl in containers from ``BUILDQ_BUILDCTL_IMAGE`` via the Docker engine: one warm
  container per worker process (the ``docker/`` package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BuildPaths, Launcher, LaunchSpec, RunningBuild

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["BuildPaths", "Launcher", "LaunchSpec", "RunningBuild", "make_launcher"]


def make_launcher(settings: Settings) -> Launcher:
    """The launcher named by ``BUILDQ_LAUNCHER`` (imported on demand: docker SDK only if used)."""
    if settings.launcher == "local":
        from .local import LocalLauncher

        return LocalLauncher(
            settings.buildctl_path, state_dir=settings.local_state_dir, deployment=settings.deployment_id
        )
    from .docker import DockerLauncher

    return DockerLauncher(settings)
