"""The Docker engine as the docker launcher uses it: lazy clients, the buildctl image, error mapping.

Errors when starting: engine unreachable → ``TransientBuildError(reason="docker_unavailable")``;
image missing and not pullable → ``PermanentBuildError(reason="image_pull_failed")``; the engine
refusing the container (4xx) → ``PermanentBuildError(reason="docker_rejected")``; other engine
errors (5xx) → ``TransientBuildError(reason="docker_error")``.

The docker SDK is imported only when the first build starts (not at import).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import PermanentBuildError, TransientBuildError

if TYPE_CHECKING:
    from ..config import Settings

CONTROL_TIMEOUT_S = 60


def is_unreachable(exc: BaseException) -> bool:
    import docker.errors
    import requests.exceptions

    if isinstance(exc, requests.exceptions.ConnectionError):
        return True
    return isinstance(exc, docker.errors.DockerException) and not isinstance(exc, docker.errors.APIError)


def unreachable(exc: BaseException, where: str) -> TransientBuildError:
    """The engine at ``where`` did not answer: transient."""
    return TransientBuildError(f"Docker engine unreachable at {where}: {exc}", reason="docker_unavailable")


def start_error(exc: Exception, image: str, where: str) -> Exception:
    """The BuildError for an engine error while creating or starting a buildctl container."""
    import docker.errors

    if isinstance(exc, TransientBuildError | PermanentBuildError):
        return exc
    if is_unreachable(exc):
        return unreachable(exc, where)
    if isinstance(exc, docker.errors.APIError) and exc.is_client_error():
        return PermanentBuildError(
            f"Docker engine refused the buildctl container ({image}): {exc.explanation or exc}",
            reason="docker_rejected",
        )
    return TransientBuildError(
        f"Docker engine error starting buildctl ({image}): {exc}", reason="docker_error"
    )


class Engine:
    """Clients for the engine at ``settings.docker_url`` (or DOCKER_HOST), made on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = settings.docker_url or "DOCKER_HOST"
        self._lock = threading.Lock()
        self._api: Any = None
        self._stream_api: Any = None

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
        with self._lock:
            if self._api is None:
                try:
                    self._api = self._new_client(CONTROL_TIMEOUT_S)
                except Exception as exc:
                    if is_unreachable(exc):
                        raise unreachable(exc, self.where) from exc
                    raise
            return self._api

    def stream_api(self) -> Any:
        """A second client without request timeout, for streams (exec output, stdin attach)."""
        api = self.api()
        with self._lock:
            if self._stream_api is None:
                self._stream_api = self._new_client(None, version=api.api_version)
            return self._stream_api

    def start_error(self, exc: Exception, image: str) -> Exception:
        return start_error(exc, image, self.where)

    def image_id(self, image: str) -> str | None:
        """The id of ``image`` on the engine, None when it is not there."""
        import docker.errors

        try:
            return str(self.api().inspect_image(image)["Id"])
        except docker.errors.ImageNotFound:
            return None

    def ensure_image(self, image: str) -> str:
        """Pull ``image`` unless present; return its id. PermanentBuildError(image_pull_failed)."""
        found = self.image_id(image)
        if found is not None:
            return found
        api = self.api()
        deadline = time.monotonic() + self.settings.docker_pull_timeout_s
        try:
            puller = self._new_client(self.settings.docker_pull_timeout_s, version=api.api_version)
            for event in puller.pull(image, stream=True, decode=True):
                if isinstance(event, dict) and event.get("error"):
                    raise RuntimeError(event["error"])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pull took longer than {self.settings.docker_pull_timeout_s:g}s")
            return str(api.inspect_image(image)["Id"])
        except Exception as exc:
            if is_unreachable(exc) and time.monotonic() < deadline:
                raise  # the engine itself is gone: transient, not the image's fault
            raise PermanentBuildError(
                f"cannot pull buildctl image {image!r} (BUILDQ_BUILDCTL_IMAGE): {exc}",
                reason="image_pull_failed",
            ) from exc
