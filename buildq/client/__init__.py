"""The Python API for producers: submit a job, wait for it, read its status, cancel it.

    from buildq.client import BuildqClient
    client = BuildqClient()                      # settings from BUILDQ_* variables
    handle = client.submit({"context": "/srv/app", "tags": ["registry:5000/app:1"]})
    record = handle.wait(timeout=600)            # the JSON result record

A job is validated here first (:class:`~buildq.errors.InvalidJobError` names the field), so an
invalid job never reaches the queue; with the workers' ``BUILDQ_SECRET_ENV`` /
``BUILDQ_ALLOWED_REPOSITORIES`` in its settings, so is one the workers would refuse.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ..config import Settings, load_settings
from ..contract.grants import check_producer_grants
from ..contract.job import BuildJob, parse_job
from ..contract.record import job_status, public_record
from ..contract.wire import build_message, new_delivery
from ..store.connect import redis_client
from ..store.jobs import JobStore
from ..store.logs import FINAL_PREFIX, LogEntry, LogStore
from ..store.scripts import replicas_for

if TYPE_CHECKING:
    from ..store.archive import Archive
    from .upload import Uploaded


class BuildqClient:
    """Talks to the Redis that is the broker and keeps buildq's state; cheap to create, connections
    made on first use. It needs no Celery: a submission is one script on that Redis."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.last_upload: Uploaded | None = None  # the context the last ``submit(upload=True)`` sent

    @cached_property
    def store(self) -> JobStore:
        client = redis_client(self.settings, socket_timeout=10, health_check_interval=30)
        return JobStore(
            client, result_ttl_s=self.settings.result_ttl_s, replicas=replicas_for(self.settings, client)
        )

    def queue_for(self, job: BuildJob) -> str:
        return self.settings.high_priority_queue if job.priority == "high" else self.settings.queue

    def submit(self, job: BuildJob | dict[str, Any] | str, *, upload: bool = False) -> BuildHandle:
        """Validate and enqueue ``job``, once: the message and the job's ``queued`` record in one
        step (:meth:`buildq.store.jobs.JobStore.submit`); submitting the same ``job_id`` again
        enqueues nothing and returns a handle to the job already there. The handle's ``job_id`` is
        also the Celery task id.

        ``upload``: ``context`` is a directory on this machine; it is packed (``.dockerignore``
        honoured) and uploaded to ``BUILDQ_CONTEXT_REPOSITORY`` first, and the job builds from the
        blob's URL (see :mod:`buildq.client.upload`)."""
        if upload:
            job = self.upload_context(job)
        parsed = parse_job(job)
        self._check_grants(parsed)
        queue = self.queue_for(parsed)
        body = parsed.to_message()
        delivery, tag = new_delivery(), new_delivery()
        message = build_message(parsed.job_id, queue, body, delivery=delivery, delivery_tag=tag)
        self.store.submit(
            parsed.job_id, queue=queue, message=message, tag=tag, delivery=delivery,
            body=json.dumps(body, separators=(",", ":")), retry_of=parsed.retry_of,
            supersede=parsed.supersede_key,
        )  # fmt: skip
        return BuildHandle(self, parsed.job_id)

    def _check_grants(self, job: BuildJob) -> None:
        check_producer_grants(
            job, secret_env=self.settings.secret_env, allowed_repositories=self.settings.allowed_repositories
        )

    def upload_context(self, job: BuildJob | dict[str, Any] | str) -> BuildJob:
        """``job`` with its local ``context`` directory uploaded and replaced by the blob's URL.
        The job is validated (and its grants checked) before anything is packed or sent."""
        from .ops import upload_job

        parsed, self.last_upload = upload_job(self.settings, job, self._check_grants)
        return parsed

    def list_jobs(
        self,
        *,
        limit: int = 20,
        states: list[str] | None = None,
        since: float | None = None,
        repos: Sequence[str] = (),
        tags: Sequence[str] = (),
        workers: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Recent jobs submitted through this client library, newest first (see ``buildq list``):
        in one of ``states``, enqueued at ``since`` (epoch s) or later, with a tag in one of the
        ``repos`` or one of the ``tags``, last run by one of the ``workers`` (shell-style patterns;
        what is not given is not filtered)."""
        from ..store.listing import JobFilter, recent_jobs

        wanted = JobFilter(tuple(repos), tuple(tags), tuple(workers))
        return recent_jobs(
            self.store.redis, limit=limit, states=states or (), since=since,
            keep=wanted if wanted != JobFilter() else None,
        )  # fmt: skip

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in the normal and high-priority queues."""
        from ..store.listing import queue_depths

        return queue_depths(self.store.redis, [self.settings.queue, self.settings.high_priority_queue])

    def retry(self, job_id: str) -> BuildHandle:
        """Submit a failed or cancelled job again as a new job (new id, same body, ``retry_of``
        naming the old one). InvalidJobError (field ``job_id``) when the job is unknown, not
        finished, succeeded, or was not submitted through this library (its body is not kept)."""
        from .ops import retry_body

        return self.submit(retry_body(job_id, self.status(job_id), self.store.info(job_id)))

    def status(self, job_id: str) -> dict[str, Any]:
        """The job in the documented record shape, whatever its state: the final record once there is
        one, else ``job_id``, ``state`` (queued | running; ``unknown`` when buildq has never seen the
        id, ``lost`` when the id dates from before this Redis's data began), ``phase``, ``attempt``,
        ``worker``, ``daemon``, ``enqueued_at``, ``started_at``."""
        record, info, epoch = self.store.status_parts(job_id)
        if record is None and not info and self.archive is not None:
            record = self.archive.record(job_id)  # left Redis: the archive has it
        return job_status(job_id, info, record, epoch)

    @cached_property
    def archive(self) -> Archive | None:
        """Where finished jobs' logs and records are kept (``BUILDQ_ARCHIVE_DIR``), when set."""
        from ..store.archive import Archive

        return Archive(self.settings.archive_dir) if self.settings.archive_dir else None

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the record is stored; TimeoutError after ``timeout`` seconds."""
        record = self.store.wait_result(job_id, timeout)
        if record is None:
            raise TimeoutError(f"job {job_id} has no result after {timeout}s")
        return public_record(record)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for cancellation: a queued job never starts, a running one is killed within 2 s."""
        self.store.request_cancel(job_id)
        return self.status(job_id)

    @cached_property
    def log_store(self) -> LogStore:
        return LogStore(
            self.store.redis, maxlen=self.settings.log_stream_maxlen, ttl_s=self.settings.log_stream_ttl_s
        )

    def logs(self, job_id: str, *, raw: bool = False) -> list[LogEntry]:
        """The log: plain lines and attempt marks (``raw``: the rawjson lines instead), from the
        archive for the attempts it holds and from Redis for the others, attempt by attempt."""
        entries = self.log_store.read(job_id)
        archived = self.archive.attempts(job_id) if self.archive is not None else []
        if archived:
            assert self.archive is not None
            kept = [
                LogEntry("archive", n, "mark" if kind == "end" else kind, line, kind == "end")
                for n in archived
                for kind, line in self.archive.read_attempt(job_id, n)
            ]
            live = [e for e in entries if e.attempt not in archived]
            entries = sorted(kept + live, key=lambda e: e.attempt)
        if raw:
            return entries
        from .logview import plain

        return plain(entries)

    def follow_logs(
        self, job_id: str, *, raw: bool = False, is_finished: Callable[[], bool] | None = None
    ) -> Iterator[LogEntry]:
        """Log entries as they are written, across retries, until the build ends (or
        ``is_finished()``); then what the archive has that the stream did not carry (an attempt's
        end, when the finishing worker archived it instead of writing it to Redis)."""
        done = is_finished or (lambda: self.store.result(job_id) is not None)
        entries = self._follow(job_id, done)
        if raw:
            return entries
        from .logview import PlainView

        return PlainView().feed(entries)

    def _follow(self, job_id: str, is_finished: Callable[[], bool]) -> Iterator[LogEntry]:
        seen: dict[int, int] = {}
        final = False
        for entry in self.log_store.follow(job_id, is_finished=is_finished):
            seen[entry.attempt] = seen.get(entry.attempt, 0) + 1
            final = final or (entry.closes and entry.line.startswith(FINAL_PREFIX))
            yield entry
        if final or self.archive is None:
            return
        for n in self.archive.attempts(job_id):
            kept = self.archive.read_attempt(job_id, n)
            for kind, line in kept[seen.get(n, 0) :]:
                yield LogEntry("archive", n, "mark" if kind == "end" else kind, line, kind == "end")


@dataclass(frozen=True)
class BuildHandle:
    """A submitted job."""

    client: BuildqClient
    job_id: str

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return self.client.wait(self.job_id, timeout)

    def status(self) -> dict[str, Any]:
        return self.client.status(self.job_id)

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.job_id)

    def logs(self, *, raw: bool = False) -> list[LogEntry]:
        return self.client.logs(self.job_id, raw=raw)

    def follow_logs(self, *, raw: bool = False) -> Iterator[LogEntry]:
        return self.client.follow_logs(self.job_id, raw=raw)


def submit(job: BuildJob | dict[str, Any] | str, settings: Settings | None = None) -> BuildHandle:
    """Shortcut: ``BuildqClient(settings).submit(job)``."""
    return BuildqClient(settings).submit(job)
