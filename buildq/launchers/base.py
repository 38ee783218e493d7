"""The launcher interface: how one ``buildctl build`` invocation is run somewhere.

A launcher turns a :class:`LaunchSpec` into a :class:`RunningBuild`. The caller then reads
stderr lines as they arrive (``lines()``), waits for the exit code, reads back the metadata
file, and always calls ``close()``. ``kill()`` may be called from any thread at any time.

Paths: the argv is built by the caller from the paths the launcher says buildctl will see
(:meth:`Launcher.prepare`), because a containerised buildctl sees its bind mounts, not the
worker's paths. The launcher also says how secrets reach buildctl: as environment variables
(``--secret id=…,env=…``, the default) or as files it writes (``--secret id=…,src=…``).
"""

from __future__ import annotations

import abc
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple


class BuildPaths(NamedTuple):
    """Paths as buildctl sees them (``None`` context for a git context).

    ``secret_files``: (secret id, file) pairs when the launcher wants the secrets as files it
    writes from :attr:`LaunchSpec.secrets`; empty: as environment variables in :attr:`LaunchSpec.env`.
    """

    context_dir: str | None
    dockerfile_dir: str | None
    metadata_file: str
    secret_files: tuple[tuple[str, str], ...] = ()


_NONE: Mapping[str, str] = MappingProxyType({})


class LaunchSpec(NamedTuple):
    """Everything a launcher needs to run one buildctl invocation.

    ``argv`` excludes the program name (it starts with ``build`` or ``debug``).
    ``env`` holds extra environment for buildctl (``BUILDKIT_HOST``, secret values named by
    ``--secret id=…,env=…``); it is never logged. ``secrets`` maps secret ids to values for a
    launcher that asked for secret files (never logged either: the repr names keys only).
    ``context_dir`` / ``dockerfile_dir`` are worker-side directories to expose read-only.
    """

    job_id: str
    argv: list[str]
    env: Mapping[str, str] = _NONE
    context_dir: str | None = None
    dockerfile_dir: str | None = None
    secrets: Mapping[str, str] = _NONE
    #: the claim generation the run belongs to (written beside it, so a reaper kills only that run)
    gen: int = 0

    def __repr__(self) -> str:
        return (
            f"LaunchSpec(job_id={self.job_id!r}, argv=[{len(self.argv)} args], env={sorted(self.env)}, "
            f"context_dir={self.context_dir!r}, dockerfile_dir={self.dockerfile_dir!r}, "
            f"secrets={sorted(self.secrets)})"
        )


class RunningBuild(abc.ABC):
    """A started buildctl process or container."""

    @abc.abstractmethod
    def lines(self) -> Iterator[str]:
        """Yield stderr lines (without the newline) as buildctl writes them; ends at EOF."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> int:
        """Block until buildctl exits; return its exit code (raise TimeoutError on timeout)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill buildctl now (idempotent, thread-safe, no error if it already exited)."""

    @abc.abstractmethod
    def read_metadata(self) -> dict[str, Any] | None:
        """Return the parsed ``--metadata-file`` content, or None if buildctl wrote none."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything (temp dirs, containers). Idempotent."""

    def finish(self) -> tuple[int, dict[str, Any] | None]:
        """buildctl's exit code and, after a 0, its metadata file; everything released after
        (raises what :meth:`wait` raises, released all the same)."""
        try:
            code = self.wait()
            return code, self.read_metadata() if code == 0 else None
        finally:
            self.close()

    def __enter__(self) -> RunningBuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Launcher(abc.ABC):
    """Runs buildctl. One instance per worker process; must be safe to reuse across builds."""

    name: str = "abstract"

    @abc.abstractmethod
    def prepare(
        self, job_id: str, context_dir: str | None, dockerfile_dir: str | None, secret_ids: Sequence[str] = ()
    ) -> BuildPaths:
        """Return the paths buildctl will see for these worker-side directories (and secrets)."""

    @abc.abstractmethod
    def start(self, spec: LaunchSpec, paths: BuildPaths) -> RunningBuild:
        """Start buildctl for ``spec``; raise a BuildError subclass if it cannot start."""

    def find_orphans(self) -> list[str]:
        """Return job ids of buildctl processes/containers this deployment's launchers left running."""
        return []

    def kill_orphan(self, job_id: str, gen: int | None = None) -> None:  # noqa: B027 - optional hook
        """Kill and remove the leftover buildctl for ``job_id`` (only that claim generation's when
        the launcher can tell them apart and ``gen`` is given; no-op by default)."""

    @property
    def domain(self) -> str:
        """Where this launcher's runs can be killed from: this host and its state folder (two
        workers with separate state folders are two places)."""
        folder = getattr(self, "state_dir", None)
        where = os.path.realpath(str(folder)) if folder is not None else ""
        return f"{socket.gethostname()}:{where}"

    def reap_scratch(self) -> list[str]:
        """Remove scratch space left by processes that are gone; what was removed (none by default)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """The worker process is stopping: release what the launcher holds (no-op by default)."""
