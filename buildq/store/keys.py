"""Every Redis key and channel name buildq uses, in one place (all under ``buildq:``).

Per job (:class:`JobKeys`, made once per job by :func:`job_keys`):

- ``job:<id>``      hash, the one place a job's state lives (written by the client at submit, by
                    the workers after). Readers get it through :func:`buildq.contract.record.job_status`,
                    which shows none of the internal fields. Fields:

                    * what was asked: ``job`` (its JSON as sent), ``queue``, ``retry_of``;
                      ``enqueued_at`` (epoch s, server clock)
                    * its current message: ``delivery`` (id), ``tag`` (delivery tag), ``pushed_at``
                      (server ms; see :mod:`buildq.store.janitor` for why it is kept)
                    * the claim: ``gen`` (claim generation), ``lease`` (the holder's token) and
                      ``lease_until`` (server ms), ``holder`` and ``domain`` (who holds it, where its
                      runs can be killed from), ``slot`` and ``slot_load`` (the daemon slot the claim
                      holds and the load index it counts in; '' when none), ``dead_gen``
                    * while building: ``state`` running, ``phase``, ``attempt``, ``worker``,
                      ``daemon``, ``started_at``, ``running`` (the run in flight, JSON)
                    * between attempts: ``attempts`` (JSON), ``window_start``, ``waiting_since``,
                      ``avoid``, ``held_by`` (the worker holding a retry's message until its ETA)
                    * ``cancel``: set by ``buildq cancel`` (a queued job never starts, a running one
                      is killed)
                    * at the end: ``record`` (the final JSON record; its presence means "done"),
                      ``done_gen`` (the claim that stored it; ``0`` for a rejected job)
- ``done:<id>``     pub/sub channel told the final state when the record is stored
- ``log:<id>``      the build log stream (see :mod:`buildq.store.logs`)

The index:

- ``jobs``          sorted set of the recent jobs, written by the script that changes a job's state:
                    the score says the state and when the job was enqueued (to the microsecond):
                    ``-enqueued_at`` while claimed, ``enqueued_at`` while queued, plus
                    :data:`BAND` × 1, 2, 3 once succeeded, failed, cancelled. So ``--state failed``
                    reads the failed band only, and a step moves a job with one ``ZADD``. The
                    janitor trims each final band to :data:`RECENT_MAX` ids and to
                    ``BUILDQ_RESULT_TTL_S``.

Shared:

- ``load:<id>``     the build slots in use on each daemon of one daemon list (``<id>``: a digest of
                    the list); a daemon whose breaker is open counts :data:`DOWN_LOAD` more, so the
                    least loaded daemon with room is the first member under the limit
- ``loads``         set of the load indexes in use (a breaker moves its daemon in each)
- ``janitor``       the lease of the one worker that runs the janitor for the deployment
- ``queues``        set of the queues the workers consume (heartbeats; the janitor reads their heads)
- ``waiting``       sorted set of the jobs put back to wait for a daemon (score: when, server ms);
                    written by the requeue script, pruned by the gauges (a member whose job moved
                    on is dropped there)
- ``gauges``, ``gauges:lease`` the deployment's queue gauges (JSON) and the lease of the one
                    worker that computes them (see :mod:`buildq.store.gauges`)
- ``cancels``       pub/sub channel told the id of every job a cancel was asked for
- ``workers``, ``domains`` sorted sets of the live worker main processes and of the places their
                    runs can be killed from (score: expiry on the server clock, ms; heartbeats)
- ``epoch``         when this Redis's buildq data began (set by the first heartbeat)
- ``daemons:down``  hash daemon -> epoch seconds it went down (the open circuit breakers)
- ``daemons:up``    hash daemon -> epoch seconds it came back; ``daemons:error`` daemon -> last error
- ``daemons:probe:<daemon>`` the lock of the one probe of a down daemon (expires)
- ``daemons:hold:<daemon>`` set while a daemon's breaker stays open whatever its probe says (its
                    own state failed builds: a full disk; expires after ``BUILDQ_DAEMON_HOLD_S``)
- ``affinity:<cache key>`` the daemon whose last successful build used this cache
- ``baseline:<cache key>`` list, newest first: the phases of a repository's last successful builds
- ``export:<cache key>`` hash, the export lease of one cache ref: ``job``, ``order`` (its
                    enqueued_at) and ``until`` (server ms) of its last holder, held while ``until`` is
                    ahead (0: given back); ``done_order`` and ``done_job`` of the newest build that
                    exported (``lua/export_lease.lua``)
- ``supersede:<key>`` the newest job submitted with a ``supersede_key`` (``lua/supersede_fn.lua``)

Kombu's Redis transport keeps delivered, unacknowledged messages in ``unacked`` (hash) and their
delivery times in ``unacked_index`` (sorted set); the janitor reads them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

PREFIX = "buildq:"
JOB_PREFIX = f"{PREFIX}job:"
JOBS_INDEX = f"{PREFIX}jobs"
FINAL_STATES = ("succeeded", "failed", "cancelled")
#: the width of one state's band in :data:`JOBS_INDEX` (more than any epoch seconds for centuries)
BAND = 10_000_000_000
#: ids kept in each final band of :data:`JOBS_INDEX`
RECENT_MAX = 10000
LOAD_PREFIX = f"{PREFIX}load:"
LOADS = f"{PREFIX}loads"
#: what an open breaker adds to its daemon's load (more than any limit: never the least loaded)
DOWN_LOAD = 1_000_000
JANITOR_LEASE = f"{PREFIX}janitor"
#: jobs requeued to wait for a daemon (score: when, server ms); read by the gauges
WAITING_INDEX = f"{PREFIX}waiting"
GAUGES = f"{PREFIX}gauges"
GAUGES_LEASE = f"{PREFIX}gauges:lease"
QUEUES = f"{PREFIX}queues"
AFFINITY_PREFIX = f"{PREFIX}affinity:"
BASELINE_PREFIX = f"{PREFIX}baseline:"
LOG_PREFIX = f"{PREFIX}log:"
EXPORT_PREFIX = f"{PREFIX}export:"
SUPERSEDE_PREFIX = f"{PREFIX}supersede:"
CANCELS_CHANNEL = f"{PREFIX}cancels"
DAEMONS_DOWN = f"{PREFIX}daemons:down"
DAEMONS_UP = f"{PREFIX}daemons:up"
DAEMONS_ERROR = f"{PREFIX}daemons:error"
#: live worker main processes and live domains (where runs can be killed from): sorted sets scored
#: by expiry (server clock, ms), written by each worker's heartbeat
WORKERS = f"{PREFIX}workers"
#: when this Redis's buildq data began (epoch s, server clock; set by the first heartbeat, so a Redis
#: that lost its data gets a new one): a job id made before it was lost with that data
EPOCH = f"{PREFIX}epoch"
DOMAINS = f"{PREFIX}domains"
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


class JobKeys(NamedTuple):
    """The keys and channel of one job, and the export lease of its cache ref ('' for none)."""

    hash: str
    log: str
    done: str
    export: str = ""


def job_keys(job_id: str, cache_key: str | None = None) -> JobKeys:
    """All of ``job_id``'s keys at once (with ``cache_key``: its export lease's too)."""
    export = export_lease_key(cache_key) if cache_key else ""
    return JobKeys(JOB_PREFIX + job_id, LOG_PREFIX + job_id, f"{PREFIX}done:{job_id}", export)


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def log_key(job_id: str) -> str:
    """The job's log stream."""
    return LOG_PREFIX + job_id


def final_band(state: str) -> int:
    """What a job that ended in ``state`` adds to its score in :data:`JOBS_INDEX`."""
    return BAND * (FINAL_STATES.index(state) + 1)


def state_band(state: str) -> tuple[float, float]:
    """The scores (low, high: high excluded) of the jobs in ``state`` in :data:`JOBS_INDEX`."""
    if state == "running":
        return (-BAND, 0)
    if state == "queued":
        return (0, BAND)
    low = final_band(state)
    return (low, low + BAND)


def load_key(daemons: Sequence[str]) -> str:
    """The load index of one daemon list (the same list, in any order, gives the same key)."""
    digest = hashlib.sha256("\n".join(sorted(set(daemons))).encode()).hexdigest()[:12]
    return LOAD_PREFIX + digest


def affinity_key(cache_key: str) -> str:
    """The daemon that last built with this cache (cache-affinity routing)."""
    return AFFINITY_PREFIX + cache_key


def daemon_probe_key(daemon: str) -> str:
    """The lock held while one worker probes a down daemon."""
    return f"{PREFIX}daemons:probe:{daemon}"


def daemon_hold_key(daemon: str) -> str:
    """Set (with a TTL) while ``daemon``'s breaker must stay open whatever its probe says."""
    return f"{PREFIX}daemons:hold:{daemon}"


def baseline_key(cache_key: str) -> str:
    """The list of the phases of the last successful builds of ``cache_key``'s repository."""
    return BASELINE_PREFIX + cache_key


def export_lease_key(cache_key: str) -> str:
    """The export lease of one cache ref (one exporter at a time, the newest build's export wins)."""
    return EXPORT_PREFIX + cache_key


def supersede_key(key: str) -> str:
    """The newest job of a ``supersede_key`` (validated by the job contract: no spaces, braces or globs)."""
    return SUPERSEDE_PREFIX + key
