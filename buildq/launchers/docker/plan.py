"""Pure helpers of the docker launcher: what a runner container is made of (:class:`BoxSpec`),
paths inside its containers, labels, the per-build command file, the secrets archive, what the
runner prints, which contexts a warm container can see.

Inside every container the docker launcher starts, the runner script (``runner.sh``) keeps
one folder per build, ``/buildq/run/b/<run>`` with ``<run> = <job id>.<n>``; buildctl writes its
metadata file there and reads its secret files from there.
"""

from __future__ import annotations

import codecs
import io
import json
import posixpath
import re
import shlex
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RUN_DIR = "/buildq/run"
#: one-shot containers see the context and the Dockerfile folder here (read-only binds)
CONTEXT_DIR = "/buildq/context"
DOCKERFILE_DIR = "/buildq/dockerfile"

MANAGED_LABEL = "buildq.managed"
JOB_LABEL = "buildq.job_id"
WARM_LABEL = "buildq.warm"
WORKER_LABEL = "buildq.worker"
#: the deployment a container belongs to: a worker reaps only its own deployment's containers
DEPLOYMENT_LABEL = "buildq.deployment"
WORKER_STARTED_LABEL = "buildq.worker.started"
CONFIG_LABEL = "buildq.warm.config"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RUN = re.compile(r"[A-Za-z0-9_.-]+\.[0-9]+")
_RUN_IN_ARGS = re.compile(re.escape(RUN_DIR) + r"/b/([A-Za-z0-9_.-]+)\.[0-9]+/metadata\.json")


@dataclass
class BoxSpec:
    """What to create: image, name, labels, read-only binds (host source, target), network."""

    image: str
    name: str
    labels: dict[str, str]
    network: str
    binds: list[tuple[str, str]] = field(default_factory=list)
    auto_remove: bool = False


def container_name(job_id: str) -> str:
    """A unique, valid container name that starts with the (sanitised) job id."""
    safe = _UNSAFE.sub("-", job_id)[:64] or "job"
    return f"buildq-{safe}-{uuid.uuid4().hex[:8]}"


def warm_name(hostname: str, pid: int) -> str:
    """The unique name of a worker process's warm container (also its shared folder's name)."""
    safe = _UNSAFE.sub("-", hostname)[:40] or "host"
    return f"buildq-warm-{safe}-{pid}-{uuid.uuid4().hex[:6]}"


def run_id(job_id: str, n: int) -> str:
    """``<job id>.<n>``: the build's folder under ``/buildq/run/b`` (n counts a launcher's builds)."""
    return f"{_UNSAFE.sub('-', job_id)[:128] or 'job'}.{n}"


def run_dir(run: str, root: str = RUN_DIR) -> str:
    return f"{root}/b/{run}"


def metadata_path(run: str) -> str:
    return run_dir(run) + "/metadata.json"


def secret_path(run: str, index: int) -> str:
    return f"{run_dir(run)}/secret-{index}"


def run_of(metadata_file: str) -> str:
    """The run id of a metadata path made by :func:`metadata_path`."""
    return posixpath.basename(posixpath.dirname(metadata_file))


def job_of(run: str) -> str:
    return run.rsplit(".", 1)[0]


def command_file(argv: Sequence[str], env: Mapping[str, str]) -> bytes:
    """The ``cmd`` file the runner sources: ``export`` lines, then ``set --`` with the arguments."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}\n")
    lines.append("set -- " + " ".join(shlex.quote(a) for a in argv) + "\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def secrets_tar(files: Mapping[str, bytes]) -> bytes:
    """A tar of ``name → content`` with mode 0600 (sent on the runner's stdin in exec mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parse_exec_output(stdout: bytes) -> tuple[int | None, dict[str, Any] | None]:
    """The exit status and metadata the runner prints in exec mode (``rc N`` line, then the file)."""
    head, _, rest = stdout.partition(b"\n")
    match = re.fullmatch(rb"rc (\d+)", head.strip())
    if match is None:
        return None, None
    try:
        data = json.loads(rest) if rest.strip() else None
    except ValueError:
        data = None
    return int(match.group(1)), data if isinstance(data, dict) else None


def jobs_in_listing(stdout: bytes) -> list[str]:
    """Job ids of the runs ``runner.sh list`` printed (one ``<job id>.<n>`` a line; others skipped)."""
    jobs: list[str] = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        run = line.strip()
        if _RUN.fullmatch(run) and job_of(run) not in jobs:
            jobs.append(job_of(run))
    return jobs


def jobs_in_top(top: Mapping[str, Any]) -> list[str]:
    """Job ids of the buildctl processes in a ``docker top`` answer (from their metadata path; the
    command column must be whole: see ``reap.TOP_PS_ARGS``)."""
    titles = [str(t).upper() for t in top.get("Titles") or []]
    col = next((i for i, t in enumerate(titles) if t in ("CMD", "COMMAND", "ARGS")), len(titles) - 1)
    jobs: list[str] = []
    for row in top.get("Processes") or []:
        args = " ".join(str(c) for c in row[col:]) if col >= 0 else ""
        if "buildctl" not in args:
            continue
        match = _RUN_IN_ARGS.search(args)
        if match and match.group(1) not in jobs:
            jobs.append(match.group(1))
    return jobs


def inside(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def warm_plan(
    context_dir: str | None, dockerfile_dir: str | None, roots: Sequence[str], *, warm: bool
) -> str | None:
    """None when a build can run in the warm container, else why it needs a one-shot container.

    The folders are the worker-side ones with symlinks resolved; ``roots`` likewise (the warm
    container mounts each root read-only at the same path).
    """
    if not warm:
        return "BUILDQ_DOCKER_WARM is off"
    for what, path in (("context", context_dir), ("Dockerfile folder", dockerfile_dir)):
        if path is not None and not any(inside(path, root) for root in roots):
            listed = ", ".join(roots) if roots else "none set"
            return f"{what} {path} is outside BUILDQ_CONTEXT_ROOTS ({listed})"
    return None


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Decode a byte stream as UTF-8 and yield its lines without ``\\n`` (partial chunks joined)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        *complete, pending = pending.split("\n")
        yield from (line.rstrip("\r") for line in complete)
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending.rstrip("\r")
