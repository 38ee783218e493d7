"""One attempt of one build, apart from Celery: argv → launcher → progress → outcome.

:func:`run_attempt` starts buildctl through a launcher, feeds every stderr line to the progress
tracker (and to ``on_line``) as it arrives, kills buildctl when ``should_stop()`` says so or the
deadline passes, then reads the metadata file and classifies the exit. It never raises for a
build failure: the outcome is data (:class:`AttemptOutcome`). The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from ..buildkit.classify import NEVER_REACHED_REASON, Failure, classify_failure
from ..buildkit.command import BuildRequest, build_argv, split_dockerfile
from ..buildkit.progress import ProgressTracker
from ..buildkit.solvestatus import SolveStatus
from ..contract.job import BuildJob
from ..errors import BuildError, PermanentBuildError
from ..launchers.base import BuildPaths, Launcher, LaunchSpec
from ..records import AttemptOutcome
from .ticker import Ticker

Clock = Callable[[], float]

#: how often a build's watcher checks ``should_stop`` (cancellation must act within 2 s); the
#: interval of the process's :class:`~buildq.engine.ticker.Ticker`
WATCH_INTERVAL_S = 0.25


def dockerfile_dir(job: BuildJob) -> str | None:
    """Worker-side directory holding the Dockerfile (None for a remote context)."""
    if job.is_remote:
        return None
    head, _ = split_dockerfile(job.dockerfile)
    return f"{job.context}/{head}" if head else job.context


def build_request(job: BuildJob, paths: BuildPaths) -> BuildRequest:
    """The buildctl build of ``job`` with the paths buildctl sees (``paths`` from the launcher)."""
    cache_ref = job.cache_ref
    assert cache_ref is not None  # filled in by BuildJob
    return BuildRequest(
        tags=job.tags,
        cache_ref=cache_ref,
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
    )


def secret_env(job: BuildJob, environ: Mapping[str, str]) -> dict[str, str]:
    """The worker environment variables buildctl needs for the job's secrets (checked beforehand)."""
    return {s.env: environ[s.env] for s in job.secrets}


def secret_values(job: BuildJob, environ: Mapping[str, str]) -> dict[str, str]:
    """The job's secret values by secret id, for a launcher that writes secret files."""
    return {s.id: environ[s.env] for s in job.secrets}


def run_attempt(
    job: BuildJob,
    *,
    number: int,
    launcher: Launcher,
    daemon: str,
    insecure_registries: Sequence[str],
    environ: Mapping[str, str],
    timeout_s: float,
    ticker: Ticker,
    clock: Clock = time.time,
    on_line: Callable[[str, SolveStatus | None], None] | None = None,
    on_start: Callable[[], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
    extra_transient: Sequence[str] = (),
    started_at: float | None = None,
) -> AttemptOutcome:
    """Run buildctl once for ``job`` against ``daemon``; return what happened.

    ``should_stop`` is polled by ``ticker`` (every 250 ms) while buildctl runs; a non-None answer
    (``"cancelled"``) kills buildctl and becomes the outcome. Passing ``timeout_s`` kills it too
    (outcome ``timeout``). ``on_start`` is called once buildctl has been started; ``on_line``
    gets every stderr line with its parsed SolveStatus (None for a text line) as it arrives.
    ``started_at`` is the attempt's start as the caller published it (default: now).
    """
    started = started_at if started_at is not None else clock()
    tracker = ProgressTracker(clock=clock)
    context = None if job.is_remote else job.context
    dockerfile = dockerfile_dir(job)
    paths = launcher.prepare(job.job_id, context, dockerfile, [s.id for s in job.secrets])
    argv = build_argv(build_request(job, paths), insecure_registries=insecure_registries)
    as_files = bool(paths.secret_files)
    env = {"BUILDKIT_HOST": daemon, **({} if as_files else secret_env(job, environ))}
    spec = LaunchSpec(
        job_id=job.job_id, argv=argv, env=env, context_dir=context, dockerfile_dir=dockerfile,
        secrets=secret_values(job, environ) if as_files else {},
    )  # fmt: skip
    try:
        running = launcher.start(spec, paths)
    except BuildError as exc:
        failure = Failure(
            transient=not isinstance(exc, PermanentBuildError), reason=exc.reason, message=exc.message
        )
        return AttemptOutcome(
            number, daemon, started, clock(), "failed", failure=failure, tracker=tracker, reached_daemon=False
        )
    if on_start is not None:
        on_start()

    stop_reason: list[str] = []
    deadline = started + timeout_s

    def watch() -> bool:  # on the ticker's thread, every WATCH_INTERVAL_S; True: stop watching
        reason = should_stop() if should_stop is not None else None
        if reason is None and clock() >= deadline:
            reason = "timeout"
        if reason is not None:
            stop_reason.append(reason)
            running.kill()
            return True
        return False

    ticket = ticker.every(watch)
    try:
        for line in running.lines():
            status = tracker.feed(line)
            if on_line is not None:
                on_line(line, status)
        exit_code = running.wait()
        exited = clock()
        metadata = running.read_metadata() if exit_code == 0 else None
    except BuildError as exc:  # the launcher lost buildctl (its container ended, the engine went away)
        failure = Failure(
            transient=not isinstance(exc, PermanentBuildError), reason=exc.reason, message=exc.message
        )
        return AttemptOutcome(
            number, daemon, started, clock(), "failed", failure=failure, tracker=tracker,
            first_output_at=tracker.first_output_at,
        )  # fmt: skip
    finally:
        ticket.cancel()  # no watch runs after this
        running.close()

    outcome = AttemptOutcome(
        number,
        daemon,
        started,
        exited,
        "failed",
        exit_code=exit_code,
        tracker=tracker,
        first_output_at=tracker.first_output_at,
    )
    if stop_reason:
        outcome.outcome = stop_reason[0]
        message = (
            "build cancelled" if stop_reason[0] == "cancelled" else f"build exceeded its {timeout_s:g}s limit"
        )
        outcome.failure = Failure(transient=False, reason=stop_reason[0], message=message)
        return outcome
    if exit_code == 0:
        if metadata is None or "containerimage.digest" not in metadata:
            outcome.failure = Failure(
                transient=False,
                reason="no_metadata",
                message="buildctl exited 0 but wrote no image digest to --metadata-file",
            )
            return outcome
        outcome.outcome = "succeeded"
        outcome.metadata = metadata
        return outcome
    classified = classify_failure(
        exit_code, tracker.text_lines, vertex_errors=tracker.vertex_errors(), extra_transient=extra_transient
    )
    outcome.failure = classified
    # a dial failure with no progress at all: the daemon never saw this build
    outcome.reached_daemon = not (
        classified is not None and classified.reason == NEVER_REACHED_REASON and tracker.json_lines == 0
    )
    return outcome
