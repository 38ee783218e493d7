"""Every Redis key and channel name buildq uses, in one place (all under ``buildq:``).

Per job (:class:`JobKeys`, made once per job by :func:`job_keys`):

- ``job:<id>``      hash, written by the client at submit and by the workers after: ``state``
                    (queued | running | succeeded | failed | cancelled), ``phase``, ``queue``,
                    ``enqueued_at`` (epoch s, server clock), ``delivery`` (the current message's
                    id), ``job`` (the job's JSON), ``retry_of``; the claim's ``gen`` (claim
                    generation), ``holder`` and ``domain`` (who holds it, where its runs can be
                    killed from); between attempts the history: ``attempts`` (JSON), ``window_start``,
                    ``waiting_since``, ``avoid``; while building ``attempt``, ``worker``, ``daemon``,
                    ``started_at`` and ``running`` (the run in flight, JSON); until the job ends
                    ``msg``/``tag`` (its last message, for the janitor). Readers get it through
                    :func:`buildq.contract.record.job_status`, which shows none of the internal fields.
- ``result:<id>``   the final JSON record (written once; its presence means "done")
- ``lease:<id>``    the token of the claim that runs the build; expires unless renewed
- ``cancel:<id>``   set by ``buildq cancel``: a queued job never starts, a running one is killed
- ``done:<id>``     pub/sub channel told the final state when the result is stored
- ``log:<id>``      the build log stream (see :mod:`buildq.store.logs`)

Shared:

- ``slots:<daemon>`` sorted set of the daemon's build slots (see :mod:`buildq.store.slots`)
- ``queued``        sorted set of the jobs whose message the janitor keeps (score: when it is due)
- ``recent``        sorted set of the job ids submitted through the client (score: the submission
                    on the server clock, in seconds to the microsecond: newest first, no ties),
                    for ``buildq list``; trimmed at each submit to :data:`RECENT_MAX` ids and to
                    ``BUILDQ_RESULT_TTL_S``
- ``cancels``       pub/sub channel told the id of every job a cancel was asked for
- ``workers``, ``domains`` sorted sets of the live worker main processes and of the places their
                    runs can be killed from (score: expiry on the server clock, ms; heartbeats)
- ``daemons:down``  hash daemon -> epoch seconds it went down (the open circuit breakers)
- ``daemons:up``    hash daemon -> epoch seconds it came back; ``daemons:error`` daemon -> last error
- ``daemons:probe:<daemon>`` the lock of the one probe of a down daemon (expires)
- ``affinity:<cache key>`` the daemon whose last successful build used this cache
- ``baseline:<cache key>`` list, newest first: the phases of a repository's last successful builds

Kombu's Redis transport keeps delivered, unacknowledged messages in ``unacked`` (hash) and their
delivery times in ``unacked_index`` (sorted set); the janitor reads them.
"""

from __future__ import annotations

from typing import NamedTuple

PREFIX = "buildq:"
QUEUED_INDEX = f"{PREFIX}queued"
RECENT_INDEX = f"{PREFIX}recent"
#: ids kept in :data:`RECENT_INDEX`
RECENT_MAX = 10000
SLOTS_PREFIX = f"{PREFIX}slots:"
AFFINITY_PREFIX = f"{PREFIX}affinity:"
BASELINE_PREFIX = f"{PREFIX}baseline:"
LOG_PREFIX = f"{PREFIX}log:"
CANCELS_CHANNEL = f"{PREFIX}cancels"
DAEMONS_DOWN = f"{PREFIX}daemons:down"
DAEMONS_UP = f"{PREFIX}daemons:up"
DAEMONS_ERROR = f"{PREFIX}daemons:error"
#: live worker main processes and live domains (where runs can be killed from): sorted sets scored
#: by expiry (server clock, ms), written by each worker's heartbeat
WORKERS = f"{PREFIX}workers"
DOMAINS = f"{PREFIX}domains"
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


class JobKeys(NamedTuple):
    """The keys and channel of one job."""

    hash: str
    result: str
    lease: str
    cancel: str
    log: str
    done: str


def job_keys(job_id: str) -> JobKeys:
    """All of ``job_id``'s keys at once."""
    return JobKeys(
        f"{PREFIX}job:{job_id}",
        f"{PREFIX}result:{job_id}",
        f"{PREFIX}lease:{job_id}",
        f"{PREFIX}cancel:{job_id}",
        LOG_PREFIX + job_id,
        f"{PREFIX}done:{job_id}",
    )


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def result_key(job_id: str) -> str:
    return f"{PREFIX}result:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}lease:{job_id}"


def log_key(job_id: str) -> str:
    """The job's log stream."""
    return LOG_PREFIX + job_id


def slot_key(daemon: str) -> str:
    """The sorted set holding ``daemon``'s build slots."""
    return SLOTS_PREFIX + daemon


def affinity_key(cache_key: str) -> str:
    """The daemon that last built with this cache (cache-affinity routing)."""
    return AFFINITY_PREFIX + cache_key


def daemon_probe_key(daemon: str) -> str:
    """The lock held while one worker probes a down daemon."""
    return f"{PREFIX}daemons:probe:{daemon}"


def baseline_key(cache_key: str) -> str:
    """The list of the phases of the last successful builds of ``cache_key``'s repository."""
    return BASELINE_PREFIX + cache_key
