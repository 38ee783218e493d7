"""Every Redis key and channel name buildq uses, in one place (all under ``buildq:``).

- ``job:<id>``      hash: ``state`` (queued | running | succeeded | failed | cancelled), ``enqueued_at``,
                    ``queue``, ``phase``, ``attempt``, ``worker``, ``daemon``, ``started_at`` (epoch),
                    ``claims``; until claimed also ``msg``/``tag`` (the message, for the lost-message
                    janitor); from the Python client also ``job`` (the job's JSON, for ``buildq
                    retry``) and ``retry_of``. Readers get it through
                    :func:`buildq.records.job_status`, which shows none of the internal fields.
- ``result:<id>``   the final JSON record (written once; its presence means "done")
- ``lease:<id>``    the token of the worker process running the build; expires unless renewed
- ``cancel:<id>``   set by ``buildq cancel``: a queued job never starts, a running one is killed
- ``done:<id>``     pub/sub channel told the final state when the result is stored
- ``log:<id>``      the build log stream (see :mod:`buildq.store.logs`)
- ``slots:<daemon>`` sorted set of the daemon's build slots (see :mod:`buildq.store.slots`)
- ``queued``        sorted set of submitted, not yet claimed jobs (score: enqueued_at)
- ``recent``        sorted set of the job ids the Python client submitted (score: enqueued_at), for
                    ``buildq list``; trimmed at each submit to :data:`RECENT_MAX` ids and to
                    ``BUILDQ_RESULT_TTL_S`` (an id whose hash expired is skipped)
- ``daemons:down``  hash daemon -> epoch seconds it went down (the open circuit breakers)
- ``daemons:up``    hash daemon -> epoch seconds it came back; ``daemons:error`` daemon -> last error
- ``daemons:probe:<daemon>`` the lock of the one probe of a down daemon (expires)
- ``affinity:<cache key>`` the daemon whose last successful build used this cache
                    (:func:`buildq.contract.job.cache_key`); expires after ``BUILDQ_RESULT_TTL_S``
- ``baseline:<cache key>`` list, newest first: the phases of a repository's last successful
                    builds (see :mod:`buildq.store.baseline`)

Kombu's Redis transport keeps delivered, unacknowledged messages in ``unacked`` (hash) and their
delivery times in ``unacked_index`` (sorted set); the janitor reads them.
"""

from __future__ import annotations

PREFIX = "buildq:"
QUEUED_INDEX = f"{PREFIX}queued"
RECENT_INDEX = f"{PREFIX}recent"
#: ids kept in :data:`RECENT_INDEX`
RECENT_MAX = 10000
SLOTS_PREFIX = f"{PREFIX}slots:"
LOG_PREFIX = f"{PREFIX}log:"
DAEMONS_DOWN = f"{PREFIX}daemons:down"
DAEMONS_UP = f"{PREFIX}daemons:up"
DAEMONS_ERROR = f"{PREFIX}daemons:error"
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def result_key(job_id: str) -> str:
    return f"{PREFIX}result:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}lease:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def done_channel(job_id: str) -> str:
    """Pub/sub channel told when the job's result is stored."""
    return f"{PREFIX}done:{job_id}"


def log_key(job_id: str) -> str:
    """The job's log stream."""
    return LOG_PREFIX + job_id


def slot_key(daemon: str) -> str:
    """The sorted set holding ``daemon``'s build slots."""
    return SLOTS_PREFIX + daemon


def affinity_key(cache_key: str) -> str:
    """The daemon that last built with this cache (cache-affinity routing)."""
    return f"{PREFIX}affinity:{cache_key}"


def daemon_probe_key(daemon: str) -> str:
    """The lock held while one worker probes a down daemon."""
    return f"{PREFIX}daemons:probe:{daemon}"


def baseline_key(cache_key: str) -> str:
    """The list of the phases of the last successful builds of ``cache_key``'s repository."""
    return f"{PREFIX}baseline:{cache_key}"
