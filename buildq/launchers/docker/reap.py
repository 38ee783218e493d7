"""Leftovers of the docker launcher: one-shot containers, builds in warm containers, warm
containers of worker processes that are gone, worker-side folders of ended containers.

One-shot containers are found by their labels. A build in a warm container is found by the
runner's own pid files (its ``list`` command in a ``docker exec``: each running build's folder is
named after its job), and only when that exec cannot be made through ``docker top`` with whole
command lines (its buildctl's ``--metadata-file`` path names the job). It is killed with the
runner's ``kill`` command in a ``docker exec``: the container and the other builds in it stay.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Any

from .containers import exec_runner, worker_gone
from .plan import DEPLOYMENT_LABEL, JOB_LABEL, MANAGED_LABEL, WARM_LABEL, jobs_in_listing, jobs_in_top

#: a worker-side folder whose container has ended is removed once it is this old
STALE_FOLDER_S = 60.0
#: ``docker top``'s ps options: each process's pid and whole command line. The engine runs its
#: host's ps, which cuts lines to the width in the engine's COLUMNS without ``ww``; busybox's ps
#: knows no ``-w`` (the engine then answers an error), so the second is tried after the first.
TOP_PS_ARGS = ("-ww -o pid,args", "-o pid,args")


def managed(api: Any, *labels: str) -> list[dict[str, Any]]:
    return list(api.containers(all=True, filters={"label": [f"{MANAGED_LABEL}=true", *labels]}))


def warm_jobs(api: Any, deployment: str) -> list[tuple[str, list[str]]]:
    """(container id, job ids of its running builds) for each running warm container of ``deployment``."""
    found = []
    for c in managed(api, f"{WARM_LABEL}=true", f"{DEPLOYMENT_LABEL}={deployment}"):
        if c.get("State") != "running":
            continue
        try:
            found.append((c["Id"], running_jobs(api, c["Id"])))
        except Exception:  # noqa: BLE001 - it ended meanwhile
            continue
    return found


def running_jobs(api: Any, container_id: str) -> list[str]:
    """Job ids of the builds running in a runner container: from the runner's pid files (``list``),
    else (the exec refused, or the runner failed) from :func:`top`."""
    import docker.errors

    try:
        exec_id, out = exec_runner(api, container_id, "list")
        if api.exec_inspect(exec_id).get("ExitCode") == 0:
            return jobs_in_listing(out)
    except docker.errors.APIError as exc:
        if exc.status_code in (404, 409):  # removed, or not running
            raise
    return jobs_in_top(top(api, container_id))


def top(api: Any, container_id: str) -> dict[str, Any]:
    """``docker top`` of the container with whole command lines (:data:`TOP_PS_ARGS`)."""
    import docker.errors

    wide, plain = TOP_PS_ARGS
    try:
        return dict(api.top(container_id, ps_args=wide))
    except docker.errors.APIError as exc:
        if exc.status_code in (404, 409):
            raise
    return dict(api.top(container_id, ps_args=plain))


def find_orphans(api: Any, state_dir: str, deployment: str) -> list[str]:
    """Job ids of ``deployment``'s buildctl runs on the engine (see ``DockerLauncher.find_orphans``);
    another deployment's containers are never looked at."""
    jobs: list[str] = []
    for c in managed(api, f"{DEPLOYMENT_LABEL}={deployment}"):
        labels = c.get("Labels") or {}
        if labels.get(WARM_LABEL) == "true" and worker_gone(labels):
            remove(api, c["Id"])
        elif labels.get(JOB_LABEL) and labels[JOB_LABEL] not in jobs:
            jobs.append(labels[JOB_LABEL])
    for _, running in warm_jobs(api, deployment):
        jobs.extend(job for job in running if job not in jobs)
    remove_stale_folders(state_dir)
    return jobs


def kill_orphan(api: Any, job_id: str, deployment: str) -> None:
    """Remove ``deployment``'s one-shot containers of ``job_id``; kill its builds in warm containers."""
    for c in managed(api, f"{JOB_LABEL}={job_id}", f"{DEPLOYMENT_LABEL}={deployment}"):
        remove(api, c["Id"])
    for container, running in warm_jobs(api, deployment):
        if job_id in running:
            try:
                exec_runner(api, container, "kill", f"{job_id}.*")
            except Exception:  # noqa: BLE001 - it ended meanwhile, and the build with it
                pass


def remove(api: Any, container_id: str) -> None:
    import docker.errors

    try:
        api.remove_container(container_id, v=True, force=True)
    except docker.errors.NotFound:
        pass


def remove_stale_folders(state_dir: str, now: float | None = None) -> list[str]:
    """Remove worker-side folders whose container has ended (nobody reads their ``ctl`` FIFO)."""
    try:
        entries = list(os.scandir(state_dir))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith("buildq-"):
            continue
        try:
            if (now or time.time()) - entry.stat().st_mtime < STALE_FOLDER_S:
                continue  # maybe still being set up
            fd = os.open(f"{entry.path}/ctl", os.O_WRONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            pass  # never got as far as the FIFO
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                continue
        else:
            os.close(fd)
            continue  # a runner reads it: in use
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.name)
    return removed
