"""This host's runs of buildctl: one small file per run, stamped by its supervisor, read by the reaper.

A pool process opens a run's file before it launches buildctl (the job, the claim generation, the
pool process's pid) and touches it each time its lease renewal succeeds; it removes the file when the
run is over. The worker main process reads them every second (:class:`RunRegistry.runs`): a run
whose supervisor has not renewed for longer than the lease lives, or whose supervisor process is
gone, has lost its claim (another delivery may take the job over), so the host's reaper kills it and
says so in Redis. This is what lets a takeover from another host know the old run is dead before it
launches a new one (see :meth:`buildq.engine.lifecycle.Lifecycle.handle`).

Files are created with ``O_EXCL | O_NOFOLLOW`` and mode 0600 in a folder the worker owns.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    """One run on this host: its job, claim generation, supervising process and last stamp."""

    job_id: str
    gen: int
    owner: int
    stamped_at: float
    path: Path


class RunRegistry:
    """The run files in ``folder`` (made on first use)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def open(self, job_id: str, gen: int) -> Path | None:
        """The file of a run about to start (None when it cannot be written: the run goes on,
        unreaped by this host's reaper)."""
        path = self.folder / f"{job_id}.{gen}.{os.getpid()}.run"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        except OSError:
            return None
        try:
            os.write(fd, json.dumps({"job_id": job_id, "gen": gen, "owner": os.getpid()}).encode())
        finally:
            os.close(fd)
        return path

    @staticmethod
    def stamp(path: Path | None) -> None:
        """The run's supervisor renewed its claim just now."""
        if path is not None:
            try:
                os.utime(path)
            except OSError:
                pass

    @staticmethod
    def close(path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)

    def runs(self) -> list[Run]:
        """Every run file in the folder (unreadable ones skipped)."""
        out = []
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return []
        for entry in entries:
            if not entry.name.endswith(".run") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                data = json.loads(Path(entry.path).read_text())
                out.append(
                    Run(
                        str(data["job_id"]),
                        int(data["gen"]),
                        int(data["owner"]),
                        entry.stat().st_mtime,
                        Path(entry.path),
                    )  # fmt: skip
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def forget(self, job_id: str, below_gen: int) -> None:
        """Remove the files of ``job_id``'s runs of generations below ``below_gen`` (their runs were
        killed by the claim that took the job over on this host)."""
        for run in self.runs():
            if run.job_id == job_id and run.gen < below_gen:
                run.path.unlink(missing_ok=True)


def stale(run: Run, *, lease_ttl_s: float, now: float | None = None) -> bool:
    """Whether ``run`` has lost its claim as far as this host can tell: its supervisor has not
    renewed for longer than a lease lives, or its supervising process is gone."""
    if not os.path.exists(f"/proc/{run.owner}"):
        return True
    return (time.time() if now is None else now) - run.stamped_at > lease_ttl_s
