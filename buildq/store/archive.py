"""Finished jobs leave Redis: their logs and records kept in a file tree (``BUILDQ_ARCHIVE_DIR``).

Why files and not the registry (where ``submit --upload`` puts contexts): a log must outlive the
registry's garbage collection (a blob no manifest references is deleted by ``registry
garbage-collect``), must be readable without registry credentials by whoever reads logs, and is
written by many workers at once — a shared folder (a volume, NFS, an object-store mount) does all
three, and a lost or slow archive never holds a build up: the log then stays in Redis.

Layout, one folder per job (``<root>/<2 hex of sha256(job id)>/<job id>/``):

- ``attempt-<n>.log.gz``  the lines of attempt ``n`` as stored (gzip of
  :func:`buildq.store.logs.encode_lines`: one line each, a kind letter in front), written by the
  worker that ran it when the attempt ended;
- ``record.json``         the final record, written once it is stored in Redis.

Job ids are checked before they make a path (:data:`~buildq.store.jobs.JOB_ID_RE`); files are
made with ``O_EXCL | O_NOFOLLOW`` under a temporary name and renamed into place, and a job folder
that is a symlink is refused. Nothing here deletes: keep the tree as long as you want the history
(e.g. ``find <root> -mindepth 2 -maxdepth 2 -mtime +90 -exec rm -r {} +``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import uuid
import zlib
from pathlib import Path
from typing import Any

from ..errors import BuildqError
from .logs import decode_lines, encode_lines

#: a job id as the contract allows it (checked again here: paths are made from it)
_JOB_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ATTEMPT_RE = re.compile(r"\Aattempt-(\d{1,4})\.log\.gz\Z")


class ArchiveError(BuildqError):
    """The archive could not be written or read (the folder, a file, the job id)."""


class GzipLines:
    """An attempt's stored lines, compressed as they come (a gzip member kept in memory)."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._parts: list[bytes] = []
        self._any = False

    def add(self, lines: list[tuple[str, str]]) -> None:
        if lines:
            self._parts.append(self._z.compress((("\n" if self._any else "") + encode_lines(lines)).encode(
                "utf-8", "replace")))  # fmt: skip
            self._any = True

    def finish(self) -> bytes:
        """The whole gzip file (once)."""
        return b"".join([*self._parts, self._z.flush()])


class Archive:
    """The archive under ``root`` (made when missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID_RE.match(job_id):
            raise ArchiveError(f"job_id: {job_id!r} is not a job id")
        return self.root / hashlib.sha256(job_id.encode()).hexdigest()[:2] / job_id

    # -- writes (the worker) -------------------------------------------------------------------
    def write_attempt(self, job_id: str, attempt: int, gz: bytes) -> Path:
        """Keep attempt ``attempt``'s log (a gzip file's bytes)."""
        return self._write(job_id, f"attempt-{int(attempt)}.log.gz", gz)

    def write_record(self, job_id: str, record: str) -> Path:
        """Keep the job's final record (its JSON)."""
        return self._write(job_id, "record.json", record.encode("utf-8"))

    def _write(self, job_id: str, name: str, data: bytes) -> Path:
        folder = self.job_dir(job_id)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                folder.mkdir(mode=0o755)
            except FileExistsError:
                pass
            info = os.lstat(folder)
            if not stat.S_ISDIR(info.st_mode):
                raise ArchiveError(f"{folder} is not a folder (a symlink?): not written")
            tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, folder / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ArchiveError(f"archive {self.root}: {exc}") from exc
        return folder / name

    # -- reads (buildq logs, buildq status) ----------------------------------------------------
    def attempts(self, job_id: str) -> list[int]:
        """The attempts whose log is archived, in order."""
        try:
            names = os.listdir(self.job_dir(job_id))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise ArchiveError(f"archive {self.root}: {exc}") from exc
        return sorted(int(m.group(1)) for m in map(_ATTEMPT_RE.match, names) if m)

    def read_attempt(self, job_id: str, attempt: int) -> list[tuple[str, str]]:
        """Attempt ``attempt``'s (kind, line) pairs."""
        path = self.job_dir(job_id) / f"attempt-{int(attempt)}.log.gz"
        try:
            with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n") as fh:
                return decode_lines(fh.read())
        except (OSError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"archive {path}: {exc}") from exc

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The archived record, None when there is none."""
        path = self.job_dir(job_id) / "record.json"
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"archive {path}: {exc}") from exc
