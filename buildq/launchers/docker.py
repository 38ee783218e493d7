"""The ``docker`` launcher: buildctl in a throw-away container from ``BUILDQ_BUILDCTL_IMAGE``.

One container per build: entrypoint ``buildctl``, command ``spec.argv``, environment ``spec.env``,
labels ``buildq.managed=true`` and ``buildq.job_id=<job>``, network ``BUILDQ_DOCKER_NETWORK``.
Inside it buildctl sees the context at ``/buildq/context`` and the Dockerfile folder at
``/buildq/dockerfile`` (read-only bind mounts of the worker-side folders), and writes its metadata
file into ``/buildq/out``, an anonymous volume read back through the engine
(``get_archive``) after exit. Nothing is shared through the worker's filesystem except the two
bind sources, so the worker may itself run in a container (the bind sources are then paths on
the engine's host).

Errors when starting: engine unreachable → ``TransientBuildError(reason="docker_unavailable")``;
image missing and not pullable → ``PermanentBuildError(reason="image_pull_failed")``; the engine
refusing the container (4xx) → ``PermanentBuildError(reason="docker_rejected")``; other engine
errors (5xx) → ``TransientBuildError(reason="docker_error")``.

The docker SDK is imported only when the first build starts (not at import).
"""

from __future__ import annotations

import codecs
import io
import json
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import PermanentBuildError, TransientBuildError
from .base import BuildPaths, Launcher, LaunchSpec, RunningBuild

if TYPE_CHECKING:
    from ..config import Settings

CONTEXT_DIR = "/buildq/context"
DOCKERFILE_DIR = "/buildq/dockerfile"
OUT_DIR = "/buildq/out"
METADATA_FILE = OUT_DIR + "/metadata.json"
MANAGED_LABEL = "buildq.managed"
JOB_LABEL = "buildq.job_id"
DEPLOYMENT_LABEL = "buildq.deployment"
CONTROL_TIMEOUT_S = 60


def container_name(job_id: str) -> str:
    """A unique, valid container name that starts with the (sanitised) job id."""
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", job_id)[:64] or "job"
    return f"buildq-{safe}-{uuid.uuid4().hex[:8]}"


def split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
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


def file_from_tar(data: bytes) -> bytes | None:
    """The content of the single regular file in a tar archive (``get_archive`` output)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile():
                fh = tar.extractfile(member)
                return fh.read() if fh is not None else None
    return None


def _is_unreachable(exc: BaseException) -> bool:
    import docker.errors
    import requests.exceptions

    if isinstance(exc, requests.exceptions.ConnectionError):
        return True
    return isinstance(exc, docker.errors.DockerException) and not isinstance(exc, docker.errors.APIError)


def unreachable(exc: BaseException, where: str) -> TransientBuildError:
    """The engine at ``where`` did not answer: transient."""
    return TransientBuildError(f"Docker engine unreachable at {where}: {exc}", reason="docker_unavailable")


def start_error(exc: Exception, image: str, where: str) -> Exception:
    """The BuildError for an engine error while creating or starting the buildctl container."""
    import docker.errors

    if isinstance(exc, TransientBuildError | PermanentBuildError):
        return exc
    if _is_unreachable(exc):
        return unreachable(exc, where)
    if isinstance(exc, docker.errors.APIError) and exc.is_client_error():
        return PermanentBuildError(
            f"Docker engine refused the buildctl container ({image}): {exc.explanation or exc}",
            reason="docker_rejected",
        )
    return TransientBuildError(
        f"Docker engine error starting buildctl ({image}): {exc}", reason="docker_error"
    )


class DockerBuild(RunningBuild):
    """A started buildctl container; ``close()`` removes it with its volume."""

    def __init__(self, launcher: DockerLauncher, container_id: str, job_id: str) -> None:
        self._launcher = launcher
        self.container_id = container_id
        self.job_id = job_id
        self._lock = threading.Lock()
        self._closed = False
        self._exit_code: int | None = None
        self._metadata: dict[str, Any] | None = None
        self._metadata_read = False

    def lines(self) -> Iterator[str]:
        import docker.errors
        import requests.exceptions

        api = self._launcher.stream_api()
        try:
            chunks = api.logs(self.container_id, stdout=False, stderr=True, stream=True, follow=True)
            yield from split_lines(chunks)
        except (docker.errors.NotFound, requests.exceptions.RequestException):
            return  # removed (close) or engine gone: the stream simply ends

    def wait(self, timeout: float | None = None) -> int:
        import docker.errors
        import requests.exceptions

        if self._exit_code is not None:
            return self._exit_code
        started = time.monotonic()
        try:
            result = self._launcher.stream_api().wait(self.container_id, timeout=timeout)
        except requests.exceptions.RequestException as exc:
            if timeout is not None and time.monotonic() - started >= timeout * 0.9:
                raise TimeoutError(f"buildctl container still running after {timeout}s") from exc
            raise TransientBuildError(
                f"lost the Docker engine while waiting: {exc}", reason="docker_unavailable"
            ) from exc
        except docker.errors.NotFound as exc:
            raise TransientBuildError(
                f"buildctl container {self.container_id[:12]} vanished", reason="docker_error"
            ) from exc
        self._exit_code = int(result.get("StatusCode", -1))
        return self._exit_code

    def kill(self) -> None:
        import docker.errors
        import requests.exceptions

        with self._lock:
            if self._closed or self._exit_code is not None:
                return
            try:
                self._launcher.api().kill(self.container_id)
            except (docker.errors.APIError, requests.exceptions.RequestException):
                pass  # not running any more (409), already removed (404), or engine gone

    def read_metadata(self) -> dict[str, Any] | None:
        from docker.errors import APIError
        from requests.exceptions import RequestException

        with self._lock:  # not held during the request: kill() must never wait for it
            if self._metadata_read or self._closed:
                return self._metadata
        try:
            stream, _stat = self._launcher.api().get_archive(self.container_id, METADATA_FILE)
            raw = file_from_tar(b"".join(stream))
            data = json.loads(raw) if raw else None
        except (APIError, RequestException, tarfile.TarError, ValueError):
            data = None  # not written (failed build), unreadable, or the container is gone
        with self._lock:
            self._metadata = data if isinstance(data, dict) else None
            self._metadata_read = True
            return self._metadata

    def close(self) -> None:
        import docker.errors
        import requests.exceptions

        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._launcher.api().remove_container(self.container_id, v=True, force=True)
            except docker.errors.NotFound:
                pass
            except (docker.errors.APIError, requests.exceptions.RequestException):
                pass  # "removal already in progress" or engine gone: find_orphans() catches leftovers


class DockerLauncher(Launcher):
    """Runs buildctl containers through the engine at ``settings.docker_url`` (or DOCKER_HOST)."""

    name = "docker"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.deployment = settings.deployment_id
        self._client_lock = threading.Lock()
        self._api: Any = None
        self._stream_api: Any = None

    # -- clients (created on first use, once per launcher) ---------------------------------

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
        with self._client_lock:
            if self._api is None:
                try:
                    self._api = self._new_client(CONTROL_TIMEOUT_S)
                except Exception as exc:
                    if _is_unreachable(exc):
                        raise self._unreachable(exc) from exc
                    raise
            return self._api

    def stream_api(self) -> Any:
        """A second client without request timeout, for log streams and waits."""
        api = self.api()
        with self._client_lock:
            if self._stream_api is None:
                self._stream_api = self._new_client(None, version=api.api_version)
            return self._stream_api

    # -- Launcher --------------------------------------------------------------------------

    def prepare(self, job_id: str, context_dir: str | None, dockerfile_dir: str | None) -> BuildPaths:
        return BuildPaths(
            context_dir=CONTEXT_DIR if context_dir else None,
            dockerfile_dir=DOCKERFILE_DIR if dockerfile_dir else None,
            metadata_file=METADATA_FILE,
        )

    def start(self, spec: LaunchSpec, paths: BuildPaths) -> RunningBuild:
        import docker.errors
        import docker.types

        image = self.settings.buildctl_image
        try:
            api = self.api()
            self._ensure_image(api, image)
            mounts = [
                docker.types.Mount(target, source, type="bind", read_only=True)
                for target, source in ((CONTEXT_DIR, spec.context_dir), (DOCKERFILE_DIR, spec.dockerfile_dir))
                if source
            ]
            host_config = api.create_host_config(mounts=mounts, network_mode=self.settings.docker_network)
            created = api.create_container(
                image,
                command=list(spec.argv),
                entrypoint=["buildctl"],
                environment=dict(spec.env),
                labels={JOB_LABEL: spec.job_id, MANAGED_LABEL: "true", DEPLOYMENT_LABEL: self.deployment},
                volumes=[OUT_DIR],
                host_config=host_config,
                name=container_name(spec.job_id),
            )
        except Exception as exc:
            raise self._start_error(exc, image) from exc
        build = DockerBuild(self, created["Id"], spec.job_id)
        try:
            api.start(created["Id"])
        except Exception as exc:
            build.close()
            raise self._start_error(exc, image) from exc
        return build

    def _ensure_image(self, api: Any, image: str) -> None:
        """Pull ``image`` unless present; PermanentBuildError(image_pull_failed) if that fails."""
        import docker.errors

        try:
            api.inspect_image(image)
            return
        except docker.errors.ImageNotFound:
            pass
        deadline = time.monotonic() + self.settings.docker_pull_timeout_s
        try:
            puller = self._new_client(self.settings.docker_pull_timeout_s, version=api.api_version)
            for event in puller.pull(image, stream=True, decode=True):
                if isinstance(event, dict) and event.get("error"):
                    raise RuntimeError(event["error"])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pull took longer than {self.settings.docker_pull_timeout_s:g}s")
            api.inspect_image(image)
        except Exception as exc:
            if _is_unreachable(exc) and time.monotonic() < deadline:
                raise  # the engine itself is gone: transient, not the image's fault
            raise PermanentBuildError(
                f"cannot pull buildctl image {image!r} (BUILDQ_BUILDCTL_IMAGE): {exc}",
                reason="image_pull_failed",
            ) from exc

    def _start_error(self, exc: Exception, image: str) -> Exception:
        return start_error(exc, image, self.settings.docker_url or "DOCKER_HOST")

    def _unreachable(self, exc: BaseException) -> TransientBuildError:
        return unreachable(exc, self.settings.docker_url or "DOCKER_HOST")

    # -- orphans ---------------------------------------------------------------------------

    def _managed(self, job_id: str | None = None) -> list[dict[str, Any]]:
        labels = [f"{MANAGED_LABEL}=true", f"{DEPLOYMENT_LABEL}={self.deployment}"]
        labels += [f"{JOB_LABEL}={job_id}"] if job_id is not None else []
        return list(self.api().containers(all=True, filters={"label": labels}))

    def find_orphans(self) -> list[str]:
        """Job ids of this deployment's buildctl containers on the engine (any state)."""
        jobs: list[str] = []
        for c in self._managed():
            job = (c.get("Labels") or {}).get(JOB_LABEL)
            if job and job not in jobs:
                jobs.append(job)
        return jobs

    def kill_orphan(self, job_id: str) -> None:
        import docker.errors

        api = self.api()
        for c in self._managed(job_id):
            try:
                api.remove_container(c["Id"], v=True, force=True)
            except docker.errors.NotFound:
                pass
