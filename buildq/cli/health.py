"""``buildq health``: can this worker reach its broker, its BuildKit daemons and (docker launcher) its engine?

:func:`check_health` returns one :class:`Check` per item; :attr:`HealthReport.ok` is true when all
are ok. Items:

- ``broker``: Redis ``PING`` on ``BUILDQ_BROKER_URL``; ``result backend`` / ``state redis`` likewise
  when those URLs differ from the broker's (a non-Redis URL is reported as not checked, and ok).
- ``buildkit <daemon>``: ``buildctl debug workers`` with ``BUILDKIT_HOST=<daemon>``, run through the
  launcher like a build. Its stdout is not captured by launchers, so it is judged by the exit code
  and the ``error: …`` line on stderr; past the timeout it is killed.
- ``docker engine`` / ``docker image`` (docker launcher only): engine ``ping`` and whether
  ``BUILDQ_BUILDCTL_IMAGE`` is present locally. Daemon checks then run only if both are ok (a
  missing image would otherwise be pulled by the check itself).

Checks run concurrently, each bounded by ``timeout_s``. Details never contain URL passwords.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import unquote, urlsplit

import typer

from ..config import is_redis_url
from ..contract.record import iso
from .common import EXIT_FAILED, cli_settings

if TYPE_CHECKING:
    from rich.table import Table

    from ..config import Settings
    from ..launchers.base import Launcher
    from ..store.daemons import DaemonState


_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s/]+(?=@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;]password=)[^&;\s]+", re.IGNORECASE)


def health(as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False) -> None:
    """Check the broker, each BuildKit daemon (buildctl debug workers) and the Docker engine."""
    report = check_health(cli_settings())
    if as_json:
        checks = [
            {"name": c.name, "ok": c.ok, "detail": c.detail, "seconds": round(c.seconds, 3)}
            for c in report.checks
        ]
        daemons = [
            {"daemon": d.daemon, "up": d.up, "since": iso(d.since), "error": d.error} for d in report.daemons
        ]
        typer.echo(json.dumps({"ok": report.ok, "checks": checks, "daemons": daemons}, indent=2))
    else:
        from rich.console import Console

        Console().print(render_health(report))  # the terminal's width (80 when not a terminal)
    raise typer.Exit(0 if report.ok else EXIT_FAILED)


@dataclass(frozen=True)
class Check:
    """One item: ``ok`` or not, a one-line ``detail`` (password-free) and how long it took."""

    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class HealthReport:
    checks: tuple[Check, ...]
    #: each daemon's circuit breaker as the deployment sees it (empty when Redis did not answer)
    daemons: tuple[DaemonState, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every check is ok."""
        return all(check.ok for check in self.checks)


def mask_url_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and ``?password=`` masked."""
    text = _URL_PASSWORD.sub(r"\g<head>***", text)
    return _QUERY_PASSWORD.sub(r"\g<head>***", text)


def url_passwords(urls: Iterable[str | None]) -> list[str]:
    """The passwords (raw and URL-decoded) found in ``urls``."""
    found: list[str] = []
    for url in urls:
        if not url:
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
        match = _QUERY_PASSWORD.search(url)
        if match:
            value = url[match.end("head") :].split("&")[0].split(";")[0]
            found += [value, unquote(value)]
    return found


def _masker(settings: Settings) -> Callable[[str], str]:
    from ..engine.redact import Redactor

    urls = [settings.broker_url, settings.result_backend, settings.redis_url, settings.docker_url]
    secrets = url_passwords([*urls, *settings.daemons])
    if settings.sentinel_password is not None:
        secrets.append(settings.sentinel_password.get_secret_value())
    redactor = Redactor(secrets)
    return lambda text: redactor(mask_url_passwords(text))


def _error_text(exc: BaseException) -> str:
    from ..engine.probe import one_line

    return one_line(f"{type(exc).__name__}: {exc}")


# -- individual checks -----------------------------------------------------------------------


def check_redis(name: str, url: str, timeout_s: float, settings: Settings) -> Check:
    """``PING`` the Redis at ``url`` (no retries: one connection attempt bounded by ``timeout_s``);
    for a ``sentinel://`` URL the master the sentinels name."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from ..store.connect import redis_client

    started = time.monotonic()
    if not is_redis_url(url):
        return Check(name, True, f"not checked: {url.split('://')[0]} is not a Redis URL", 0.0)
    client = None
    try:
        client = redis_client(
            settings,
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        client.ping()
        ok, detail = True, f"PING answered by {url}"
    except Exception as exc:  # any failure is the finding
        ok, detail = False, f"{url}: {_error_text(exc)}"
    finally:
        if client is not None:
            client.close()
    return Check(name, ok, detail, time.monotonic() - started)


def check_workers(timeout_s: float, settings: Settings) -> Check:
    """At least one worker of the deployment is alive: its heartbeat (``buildq:workers``, written every
    2 s by each worker's main process, on the Redis server's clock) has not expired."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from ..store.connect import redis_client
    from ..store.jobs import JobStore

    started = time.monotonic()
    client = None
    try:
        client = redis_client(settings, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                              retry=Retry(NoBackoff(), 0))  # fmt: skip
        live = JobStore(client, result_ttl_s=settings.result_ttl_s).live()
        ok = bool(live)
        names = ", ".join(sorted(live)[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
        detail = f"{len(live)} alive: {names}" if live else "no worker has a heartbeat: none is running"
    except Exception as exc:  # any failure is the finding
        ok, detail = False, f"cannot read the heartbeats: {_error_text(exc)}"
    finally:
        if client is not None:
            client.close()
    return Check("workers", ok, detail, time.monotonic() - started)


def check_daemon(n: int, daemon: str, launcher: Launcher, timeout_s: float) -> Check:
    """``buildctl debug workers`` against ``daemon`` (:func:`buildq.engine.probe.probe_daemon`)."""
    from ..engine.probe import probe_daemon

    result = probe_daemon(launcher, daemon, timeout_s, probe_id=f"health-{n}")
    return Check(f"buildkit {daemon}", result.ok, result.detail, result.seconds)


def default_docker_client(settings: Settings, timeout_s: float) -> Any:
    """A docker SDK client for ``BUILDQ_DOCKER_URL`` (else the environment) with ``timeout_s``."""
    import docker

    if settings.docker_url:
        return docker.DockerClient(base_url=settings.docker_url, timeout=timeout_s)
    return docker.from_env(timeout=timeout_s)


def check_docker(
    settings: Settings, timeout_s: float, factory: Callable[[Settings, float], Any] | None = None
) -> list[Check]:
    """``docker engine`` ping, then (if it answered) ``docker image`` present locally."""
    started = time.monotonic()
    where = settings.docker_url or "the environment's DOCKER_HOST"
    client = None
    try:
        client = (factory or default_docker_client)(settings, timeout_s)
        client.ping()
    except Exception as exc:
        if client is not None:
            client.close()
        return [Check("docker engine", False, f"{where}: {_error_text(exc)}", time.monotonic() - started)]
    checks = [Check("docker engine", True, f"{where}: ping ok", time.monotonic() - started)]
    image = settings.buildctl_image
    started = time.monotonic()
    try:
        import docker.errors

        try:
            client.images.get(image)
            ok, detail = True, f"{image} present"
        except docker.errors.ImageNotFound:
            ok, detail = False, f"{image} absent locally (docker pull it; a build would pull it first)"
        except Exception as exc:
            ok, detail = False, f"{image}: {_error_text(exc)}"
    finally:
        client.close()
    checks.append(Check("docker image", ok, detail, time.monotonic() - started))
    return checks


# -- orchestration ---------------------------------------------------------------------------


#: the check names a task reports (used if it does not finish) and the task itself
_Task = tuple[list[str], Callable[[], list[Check]]]


def _listed(fn: Callable[..., Check], *args: Any) -> list[Check]:
    return [fn(*args)]


def _run_concurrently(tasks: list[_Task], timeout_s: float) -> list[Check]:
    """Run each task in a daemon thread; a task unfinished after ``timeout_s + GRACE_S`` fails its names."""
    from ..engine.probe import GRACE_S

    results: list[list[Check] | None] = [None] * len(tasks)
    started = time.monotonic()

    def run(i: int, names: list[str], fn: Callable[[], list[Check]]) -> None:
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = [Check(n, False, _error_text(exc), time.monotonic() - started) for n in names]

    threads = [
        threading.Thread(target=run, args=(i, names, fn), daemon=True, name=f"health-{names[0]}")
        for i, (names, fn) in enumerate(tasks)
    ]
    for thread in threads:
        thread.start()
    deadline = started + timeout_s + GRACE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    checks: list[Check] = []
    for (names, _), result in zip(tasks, results, strict=True):
        if result is None:
            elapsed = time.monotonic() - started
            result = [Check(n, False, f"no answer within {timeout_s:g}s", elapsed) for n in names]
        checks += result
    return checks


def check_health(
    settings: Settings,
    *,
    launcher: Launcher | None = None,
    timeout_s: float = 5,
    docker_factory: Callable[[Settings, float], Any] | None = None,
) -> HealthReport:
    """Check broker, result backend, state Redis, that a worker is alive, every daemon and (docker
    launcher) the engine.

    ``launcher`` defaults to the one ``BUILDQ_LAUNCHER`` names; ``docker_factory(settings, timeout)``
    (tests) replaces the docker SDK client constructor.
    """
    if launcher is None:
        from ..launchers import make_launcher

        launcher = make_launcher(settings)
    mask = _masker(settings)
    redis_urls = {"broker": settings.broker_url}
    for name, url in (("result backend", settings.result_backend), ("state redis", settings.redis_url)):
        if url and url not in redis_urls.values():
            redis_urls[name] = url
    tasks: list[_Task] = [
        ([name], partial(_listed, check_redis, name, url, timeout_s, settings))
        for name, url in redis_urls.items()
    ]
    tasks.append((["workers"], partial(_listed, check_workers, timeout_s, settings)))
    daemon_tasks: list[_Task] = [
        ([f"buildkit {d}"], partial(_listed, check_daemon, n, d, launcher, timeout_s))
        for n, d in enumerate(settings.daemons)
    ]
    if settings.launcher == "docker":
        docker_task = partial(check_docker, settings, timeout_s, docker_factory)
        first = _run_concurrently([*tasks, (["docker engine", "docker image"], docker_task)], timeout_s)
        docker_checks = [c for c in first if c.name.startswith("docker ")]
        if all(c.ok for c in docker_checks) and len(docker_checks) == 2:
            checks = first + _run_concurrently(daemon_tasks, timeout_s)
        else:
            why = "; ".join(c.name for c in docker_checks if not c.ok) or "docker"
            checks = first + [
                Check(names[0], False, f"not checked: {why} not ok", 0.0) for names, _ in daemon_tasks
            ]
    else:
        checks = _run_concurrently(tasks + daemon_tasks, timeout_s)
    masked = tuple(Check(mask(c.name), c.ok, mask(c.detail), c.seconds) for c in checks)
    return HealthReport(masked, tuple(daemon_states(settings, timeout_s)))


def daemon_states(settings: Settings, timeout_s: float) -> list[DaemonState]:
    """Every daemon's breaker (up or down, since when, last error) from the deployment's Redis."""
    from ..store.connect import redis_client
    from ..store.daemons import DaemonHealth

    try:
        client = redis_client(settings, socket_timeout=timeout_s)
        try:
            return DaemonHealth(client).states(settings.daemons)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - the Redis checks report why
        return []


def breaker_text(state: DaemonState, now: float) -> str:
    """``up`` / ``up since 12:00:03`` / ``DOWN for 42s since 12:00:03: connection refused``."""
    since = time.strftime("%H:%M:%S", time.localtime(state.since)) if state.since else None
    if state.up:
        return f"up since {since}" if since else "up"
    return f"DOWN for {now - (state.since or now):.0f}s since {since}: {state.error or 'no answer'}"


def render_health(report: HealthReport) -> Table:
    """A rich table: check, status, detail, time (detail shown verbatim, never as markup); long
    names and details fold, so it reads in 80 columns."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    title = "buildq health: " + ("ok" if report.ok else "FAILING")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("check", overflow="fold", ratio=2)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=3)
    table.add_column("time", justify="right", no_wrap=True)
    for check in report.checks:
        status = Text("ok", style="green") if check.ok else Text("FAIL", style="bold red")
        table.add_row(Text(check.name), status, Text(check.detail), f"{check.seconds * 1000:.0f} ms")
    now = time.time()
    for state in report.daemons:
        mark = Text("up", style="green") if state.up else Text("DOWN", style="bold red")
        table.add_row(Text(f"breaker {state.daemon}"), mark, Text(breaker_text(state, now)), "")
    return table
