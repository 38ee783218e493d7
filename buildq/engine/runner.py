"""One run of buildctl, launched and supervised as one unit: argv → launcher → progress → outcome.

:func:`run_build` builds the argv from the job, starts buildctl through the launcher and, from that
moment whatever raises, keeps it watched: a time limit (a timer on the process's scheduler), the
holder's periodic check (lease renewal, which may fence it out or report a cancel) and the
process's cancel notices all end it, and it is always killed and released before the function
returns. Every stderr line goes to the progress tracker and to the caller's :class:`Watch` as it
arrives. A build failure is never raised: the :class:`Outcome` says what happened.

**Run files** (:class:`RunRegistry`, at the end): this host's runs of buildctl, one small file per
run, stamped by its supervisor, read by the reaper. A pool process opens a run's file before it
launches buildctl (the job, the claim generation, the pool process's pid) and touches it each time
its lease renewal succeeds; it removes the file when the run is over. The worker main process reads
them every second (:meth:`RunRegistry.runs`): a run whose supervisor has not renewed for longer
than the lease lives, or whose supervisor process is gone, has lost its claim (another delivery may
take the job over), so the host's reaper kills it and says so in Redis. This is what lets a
takeover from another host know the old run is dead before it launches a new one (see
:meth:`buildq.engine.lifecycle.Lifecycle.handle`). Files are created with ``O_EXCL | O_NOFOLLOW``
and mode 0600 in a folder the worker owns.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..buildkit.classify import NEVER_REACHED_REASON, Failure, classify_failure
from ..buildkit.command import BuildRequest, build_argv, split_dockerfile
from ..buildkit.progress import ProgressTracker, SolveStatus
from ..contract.job import BuildJob
from ..errors import BuildError, PermanentBuildError
from ..launchers.base import BuildPaths, Launcher, LaunchSpec
from .scheduler import Handle, Scheduler

Clock = Callable[[], float]

#: why a run was stopped from outside: a cancel, the time limit, or its claim was lost
CANCELLED, TIMEOUT, FENCED = "cancelled", "timeout", "lease_lost"


@dataclass
class Outcome:
    """What one buildctl run did. ``outcome``: succeeded | failed | cancelled | timeout | lease_lost.
    Times are on the worker's clock; ``reached_daemon`` is False when buildctl could not dial the
    daemon or never started."""

    number: int
    daemon: str
    started_at: float
    exited_at: float
    outcome: str
    exit_code: int | None = None
    failure: Failure | None = None
    metadata: dict[str, Any] | None = None
    tracker: ProgressTracker = field(default_factory=ProgressTracker)
    reached_daemon: bool = True


class Watch:
    """What a caller learns of a running build; every method is called on the build's own thread
    except :meth:`check`, which runs on the scheduler's thread every ``interval_s``."""

    interval_s: float = 1.0

    def started(self, started_at: float) -> list[Handle]:
        """buildctl runs (``started_at`` on the worker's clock); what the caller scheduled for the
        run, cancelled with it."""
        return []

    def line(self, line: str, status: SolveStatus | None) -> None:
        """One stderr line and its parsed update (None for a text line)."""

    def check(self) -> str | None:
        """A reason to stop the build now (``cancelled``, ``lease_lost``), or None to go on."""
        return None


class Stopper:
    """Kills one running build once, remembering the first reason (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._kill: Callable[[], None] | None = None

    def arm(self, kill: Callable[[], None]) -> None:
        with self._lock:
            self._kill = kill
            pending = self.reason
        if pending is not None:
            kill()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            kill = self._kill
        if kill is not None:
            kill()


def dockerfile_dir(job: BuildJob) -> str | None:
    """Worker-side directory holding the Dockerfile (None for a remote context)."""
    if job.is_remote:
        return None
    head, _ = split_dockerfile(job.dockerfile)
    return f"{job.context}/{head}" if head else job.context


def build_request(
    job: BuildJob, paths: BuildPaths, cache: CachePlan | None = None, *, sbom_generator: str | None = None
) -> BuildRequest:
    """The buildctl build of ``job`` with the paths buildctl sees (``paths`` from the launcher);
    ``cache``: its refs and whether it exports (default: its ``cache_ref`` both ways); ``job`` has
    its attestations filled in (``sbom_generator``: the operator's scanner image)."""
    assert job.cache_ref is not None  # filled in by BuildJob
    cache = cache or CachePlan(job.cache_ref, (job.cache_ref,))
    return BuildRequest(
        tags=job.tags,
        cache_ref=cache.export_ref,
        import_refs=cache.import_refs,
        export_cache=cache.export,
        metadata_file=paths.metadata_file,
        filename=job.dockerfile if job.is_remote else split_dockerfile(job.dockerfile)[1],
        remote_context=job.context if job.is_remote else None,
        context_dir=paths.context_dir,
        dockerfile_dir=paths.dockerfile_dir,
        target=job.target,
        build_args=job.build_args,
        labels=job.labels,
        platforms=job.platforms,
        secrets=[] if paths.secret_files else [(s.id, s.env) for s in job.secrets],
        secret_files=paths.secret_files,
        push=job.push,
        cache_mode=job.cache_mode,
        provenance=job.provenance if job.provenance in ("min", "max") else None,
        sbom_generator=sbom_generator if job.sbom else None,
    )


@dataclass(frozen=True)
class CachePlan:
    """The registry cache of one run: exported to ``export_ref`` (when ``export``: the run holds the
    ref's export lease), imported from ``import_refs`` in order (docs/cache-scopes.md)."""

    export_ref: str
    import_refs: tuple[str, ...]
    export: bool = True


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs besides the job: where, with what, for how long."""

    number: int
    daemon: str
    launcher: Launcher
    scheduler: Scheduler
    timeout_s: float
    insecure_registries: Sequence[str] = ()
    environ: Mapping[str, str] = field(default_factory=dict)
    extra_transient: Sequence[str] = ()
    clock: Clock = time.time
    #: the claim generation the run belongs to, and this host's run files (stamped at each renewal)
    gen: int = 0
    registry: RunRegistry | None = None
    #: the SBOM generator image for a job with ``sbom`` (BUILDQ_SBOM_SCANNER_IMAGE)
    sbom_generator: str | None = None
    #: the run's cache refs and whether it exports (None: the job's ``cache_ref`` both ways)
    cache: CachePlan | None = None


def run_build(job: BuildJob, spec: RunSpec, watch: Watch, stopper: Stopper | None = None) -> Outcome:
    """Run buildctl once for ``job`` on ``spec.daemon``; what happened. ``stopper`` lets the caller
    stop it from another thread (a cancel notice); it is armed once buildctl runs."""
    stopper = stopper or Stopper()
    clock = spec.clock
    tracker = ProgressTracker(clock=clock)
    started = clock()
    context = None if job.is_remote else job.context
    dockerfile = dockerfile_dir(job)
    secrets_as_files = False
    run_file = None
    running = None
    finished = False
    handles: list[Handle] = []
    try:
        paths = spec.launcher.prepare(job.job_id, context, dockerfile, [s.id for s in job.secrets])
        secrets_as_files = bool(paths.secret_files)
        values = {s.id: spec.environ[s.env] for s in job.secrets} if secrets_as_files else {}
        env = {"BUILDKIT_HOST": spec.daemon}
        if not secrets_as_files:
            env.update({s.env: spec.environ[s.env] for s in job.secrets})
        argv = build_argv(
            build_request(job, paths, spec.cache, sbom_generator=spec.sbom_generator),
            insecure_registries=spec.insecure_registries,
        )
        launch = LaunchSpec(
            job_id=job.job_id, argv=argv, env=env, context_dir=context, dockerfile_dir=dockerfile,
            secrets=values, gen=spec.gen,
        )  # fmt: skip
        run_file = spec.registry.open(job.job_id, spec.gen) if spec.registry is not None else None
        started = clock()
        running = spec.launcher.start(launch, paths)
        stopper.arm(running.kill)
        handles.append(spec.scheduler.later(spec.timeout_s, lambda: stopper.stop(TIMEOUT)))
        handles.append(spec.scheduler.every(watch.interval_s, lambda: _checked(watch, stopper, run_file)))
        handles += watch.started(started)
        for line in running.lines():
            watch.line(line, tracker.feed(line))
        exit_code, metadata = running.finish()
        finished = True
        exited = clock()
    except BuildError as exc:  # could not start, or the launcher lost buildctl (container gone)
        failure = Failure(not isinstance(exc, PermanentBuildError), exc.reason, exc.message)
        return Outcome(
            spec.number, spec.daemon, started, clock(), "failed", failure=failure, tracker=tracker,
            reached_daemon=running is not None,
        )  # fmt: skip
    finally:
        spec.scheduler.cancel(handles)
        if running is not None and not finished:  # anything that raised leaves nothing running
            running.kill()
            running.close()
        RunRegistry.close(run_file)
    return _outcome(spec, tracker, started, exited, exit_code, metadata, stopper.reason)


def _checked(watch: Watch, stopper: Stopper, run_file: Path | None) -> bool:
    """The periodic check on the scheduler's thread; True (stop checking) once it stopped the build.
    A check that found the claim still ours stamps the run's file (the host's reaper reads it)."""
    reason = watch.check()
    if reason is not None:
        stopper.stop(reason)
        return True
    RunRegistry.stamp(run_file)
    return False


def _outcome(
    spec: RunSpec,
    tracker: ProgressTracker,
    started: float,
    exited: float,
    exit_code: int,
    metadata: dict[str, Any] | None,
    stopped: str | None,
) -> Outcome:
    out = Outcome(spec.number, spec.daemon, started, exited, "failed", exit_code=exit_code, tracker=tracker)
    if stopped is not None:
        out.outcome = stopped
        message = {
            CANCELLED: "build cancelled",
            TIMEOUT: f"build exceeded its {spec.timeout_s:g}s limit",
            FENCED: "another delivery claimed the job while this one built (lease lost)",
        }[stopped]
        out.failure = Failure(False, stopped, message)
        return out
    if exit_code == 0:
        if metadata is None or "containerimage.digest" not in metadata:
            out.failure = Failure(False, "no_metadata", "buildctl exited 0 but wrote no image digest")
            return out
        out.outcome, out.metadata = "succeeded", metadata
        return out
    failure = classify_failure(
        exit_code, tracker.text_lines, vertex_errors=tracker.vertex_errors(),
        extra_transient=spec.extra_transient,
    )  # fmt: skip
    out.failure = failure
    # a dial failure with no progress at all: the daemon never saw this build
    out.reached_daemon = not (
        failure is not None and failure.reason == NEVER_REACHED_REASON and tracker.json_lines == 0
    )
    return out


# ----------------------------------------------------------------------------------------------
# This host's run files (see the module's docstring).


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
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:  # the folder is made on first use (and again if removed)
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
