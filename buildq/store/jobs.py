"""A job's state in Redis, as a named protocol: one method per Lua script, keyword arguments only.

The producer side: :meth:`JobStore.submit` (message and job hash at once, exactly once per job id),
:meth:`JobStore.request_cancel`, and the reads (:meth:`result`, :meth:`info`, :meth:`wait_result`).
The worker side, every step fenced by the claim generation the claim hands out:

=================  ============================================================================
``claim``          take the job (lease, generation, history, cancel flag, a daemon slot): running
``take_slot``      a daemon slot for a claim that found every daemon full (polled)
``renew``          keep the lease while buildctl runs, say the phase; learn of a cancel
``requeue``        put the job back on its queue with its history (retry, wait for a daemon)
``finish``         the final record, the log's end, the claim given back
``reject``         the record of an invalid job (for its own delivery only)
``release``        give the claim back after an error
=================  ============================================================================

Each script's ``KEYS``/``ARGV`` are named at the top of its ``lua/*.lua`` file and passed here by
those names (:mod:`buildq.store.scripts`). Times the worker needs to agree on come from the Redis
server's clock (``TIME`` in the scripts), never a producer's or another worker's.

Everything about a job is in its one hash (:mod:`buildq.store.keys`): the lease, the cancel flag and
the record are fields, so a step reads them with one ``HMGET`` and writes with one ``HSET``. Daemon
slots are counted in a load index per daemon list (a sorted set, ``lua/load_fn.lua``): a claim takes
the least loaded daemon with room in O(log n) of the fleet, and the job hash says which slot it
holds, so every step that ends a claim gives exactly that slot back.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from .keys import (
    AFFINITY_PREFIX,
    CANCELS_CHANNEL,
    DAEMONS_DOWN,
    DOMAINS,
    EPOCH,
    JOB_PREFIX,
    JOBS_INDEX,
    LOADS,
    QUEUES,
    WAITING_INDEX,
    WORKERS,
    JobKeys,
    export_lease_key,
    final_band,
    job_key,
    job_keys,
    load_key,
    supersede_key,
)
from .scripts import Scripts

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: a job id as the contract allows it (checked again here: keys are made from it)
JOB_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
#: a repository not built for this long loses its baseline (renewed when it is trimmed)
BASELINE_TTL_S = 30 * 24 * 3600
#: how often a wait for a record reads it again while no message came (see :meth:`JobStore.wait_result`)
RECHECK_S = 10.0


def _announced(data: Any) -> dict[str, Any] | None:
    """The record a job's "done" message carries; None for a state word (read the hash then)."""
    if not isinstance(data, bytes | str) or data[:1] not in (b"{", "{"):
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    try:
        return float(_text(value)) if value not in (None, b"", "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class History:
    """What the workers wrote about a job before this claim (server-clock epoch seconds)."""

    enqueued_at: float
    attempts: tuple[dict[str, Any], ...] = ()
    #: where the next attempt's time window starts (the end of the previous one's); None: enqueue
    window_start: float | None = None
    #: since when every daemon has been down for this job; None: not waiting for that
    waiting_since: float | None = None
    #: the run in flight an earlier claim left behind (its holder died or was fenced out mid-build)
    running: dict[str, Any] | None = None
    #: where that earlier claim's runs could be killed from
    previous_domain: str | None = None


@dataclass(frozen=True)
class Claimed:
    """The job is ours: lease ``token``, generation ``gen``; ``daemon`` None when no daemon that is up
    had room (or the job is cancelled); ``redis_now`` is the server clock at the claim."""

    token: str
    gen: int
    redis_now: float
    history: History
    daemon: str | None = None
    cancelled: bool = False
    #: the daemon that last built with the job's cache (None: none remembered, or affinity off)
    preferred: str | None = None
    #: ``preferred`` is up but full and the caller asked to wait for it: no slot was taken
    preferred_full: bool = False
    #: the number of the attempt this claim runs (after the recorded ones and one a dead holder lost)
    attempt: int = 1
    #: the export lease asked for with the claim (``export_key``): (granted | newer | older, the
    #: other build), as :meth:`JobStore.take_export` answers; None when not asked
    export: tuple[str, str | None] | None = None


@dataclass(frozen=True)
class Finished:
    """The job already has its record (a duplicate delivery): nothing was touched."""

    record: dict[str, Any]


@dataclass(frozen=True)
class NotOurs:
    """Another delivery runs the job (``held``), or this message is not its current delivery."""

    held: bool


ClaimReply = Claimed | Finished | NotOurs


#: export_fn.lua's take_export answers
_EXPORT_ANSWERS = {1: "granted", 2: "newer", 3: "older"}


class LogEnd(NamedTuple):
    """The log's last lines as the finishing write stores them: one stream entry (``lines``, see
    :func:`buildq.store.logs.encode_lines`; '' for none) of ``attempt``, the stream then trimmed to
    ``maxlen`` entries (``exact``: exactly, else about), its TTL set to ``ttl_s`` (0: as it is)."""

    attempt: int = 0
    lines: str = ""
    maxlen: int = 0
    exact: bool = False
    ttl_s: int = 0


class ExportRelease(NamedTuple):
    """The export lease a build's last write gives back (``finish`` or ``requeue``,
    ``lua/export_fn.lua``), the one its fence names (``Fence.cache_key``): the build's ``order``
    (its enqueued_at), and ``exported`` when its export completed (then no older build exports
    after it)."""

    order: float
    exported: bool = False


@dataclass(frozen=True)
class Fence:
    """What every step of a claim holder carries: the job, the lease token and the generation."""

    job_id: str
    token: str
    gen: int
    #: the cache ref the build exports to, if any: its export lease is named with the job's keys
    cache_key: str | None = field(repr=False, compare=False, default=None)
    keys: JobKeys = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.keys is None:
            object.__setattr__(self, "keys", job_keys(self.job_id, self.cache_key))

    def export_lease(self, export: ExportRelease | None) -> str:
        """The export lease key a write gives back with ``export`` ('' for none)."""
        if export is None:
            return ""
        if not self.keys.export:
            raise ValueError(f"job {self.job_id}: an export lease to give back, no cache ref in its fence")
        return self.keys.export


class JobStore:
    """Reads and writes job state; one instance per process, sharing one connection pool."""

    def __init__(self, client: redis.Redis, *, result_ttl_s: int, replicas: Any = None) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.scripts = Scripts(client, replicas)  # replicas: see buildq.store.connect.Replicas
        self._local = threading.local()
        #: the load indexes this process registered (:meth:`register_daemons`)
        self._registered: dict[str, tuple[str, ...]] = {}

    # -- producers ---------------------------------------------------------------------------
    def submit(
        self,
        job_id: str,
        *,
        queue: str,
        message: bytes,
        tag: str,
        delivery: str,
        body: str,
        retry_of: str | None = None,
        supersede: str | None = None,
    ) -> bool:
        """Push ``message`` to ``queue`` and write the job hash, at once, timed by the server
        clock; False (nothing pushed) when the job id was submitted before. ``WAIT`` ends it when
        replicas are wanted (:class:`~buildq.errors.NotReplicatedError` when too few confirm).
        ``supersede``: the job's ``supersede_key``; the older job of that key still queued or
        running is cancelled in the same step (``lua/supersede_fn.lua``)."""
        reply = self.scripts.durable(
            "submit", what=f"submission of job {job_id}", strict_job=job_id,
            queue=queue, job_hash=job_key(job_id), jobs_index=JOBS_INDEX,
            supersede_key=supersede_key(supersede) if supersede else "", message=message, tag=tag,
            delivery=delivery, job_id=job_id, queue_name=queue, body=body, retry_of=retry_of or "",
            ttl=self.result_ttl_s, job_prefix=JOB_PREFIX, cancels=CANCELS_CHANNEL,
        )  # fmt: skip
        return bool(reply[0])

    def supersede(
        self, job_id: str, key: str, *, made_at: float | None = None
    ) -> tuple[str | None, str | None]:
        """Make ``job_id`` the newest job of ``key`` unless a newer one is (``lua/supersede.lua``):
        (the older job it cancelled, the newer job that cancelled it), None for none. ``made_at``:
        when a job never submitted was made (its id says so), else it is ordered by now."""
        older, newer = self.scripts.call(
            "supersede", pointer=supersede_key(key), job_hash=job_key(job_id), job_id=job_id,
            job_prefix=JOB_PREFIX, cancels=CANCELS_CHANNEL, ttl=self.result_ttl_s,
            order_hint=repr(made_at) if made_at is not None else "",
        )  # fmt: skip
        return _text(older) or None, _text(newer) or None

    # -- the export lease of a cache ref --------------------------------------------------------
    def take_export(
        self, cache_key: str, *, job_id: str, order: float, ttl_s: float
    ) -> tuple[str, str | None]:
        """Take (or, held already, renew) the export lease of ``cache_key`` for ``job_id`` (built in
        ``order``, its enqueued_at): (``granted`` | ``newer`` | ``older``, the other build)."""
        answer, other = self.scripts.call(
            "export_lease", lease=export_lease_key(cache_key), op="take", job_id=job_id, order=repr(order),
            ttl_ms=max(1, int(ttl_s * 1000)), exported="", keep_s=self.result_ttl_s,
        )  # fmt: skip
        return _EXPORT_ANSWERS[int(answer)], _text(other) or None

    def release_export(self, cache_key: str, *, job_id: str, order: float, exported: bool) -> bool:
        """Give back the export lease of ``cache_key`` (``exported``: its export completed, so no
        older build exports after it); False when ``job_id`` did not hold it."""
        answer, _ = self.scripts.call(
            "export_lease", lease=export_lease_key(cache_key), op="release", job_id=job_id,
            order=repr(order), ttl_ms=0, exported="1" if exported else "", keep_s=self.result_ttl_s,
        )  # fmt: skip
        return bool(answer)

    def request_cancel(self, job_id: str, *, reason: str = "1") -> bool:
        """Ask for the job's cancellation (a queued job never starts, a running one is killed, see
        ``lua/cancel.lua``); False when it has its record already."""
        return bool(
            self.scripts.call(
                "cancel",
                job_hash=job_key(job_id),
                job_id=job_id,
                reason=reason,
                cancels=CANCELS_CHANNEL,
                ttl=self.result_ttl_s,
            )  # fmt: skip
        )

    # -- the claim and its holder --------------------------------------------------------------
    def register_daemons(self, daemons: Sequence[str], *, again: bool = False) -> str:
        """The load index of ``daemons``, registered (``lua/register_load.lua``) once per process
        (``again``: anyway, correcting what it shows of the breakers); its key."""
        unique = tuple(dict.fromkeys(daemons))
        key = load_key(unique)
        if again or key not in self._registered:
            self.scripts.call(
                "register_load", load_index=key, loads=LOADS, down_hash=DAEMONS_DOWN, daemons=list(unique)
            )
            self._registered[key] = unique
        return key

    def claim(
        self,
        job_id: str,
        *,
        delivery: str,
        daemons: Sequence[str],
        limit: int,
        ttl_s: float,
        worker: str,
        domain: str,
        body: str,
        queue: str,
        cache_key: str | None = None,
        affinity_wait: bool = False,
        export_key: str | None = None,
    ) -> ClaimReply:
        """Take ``job_id`` for the message whose delivery id is ``delivery`` (see ``lua/claim.lua``),
        with a slot on the least loaded of ``daemons`` that is up and has room; for a build that
        exports to the cache of ``export_key`` and starts at once, its export lease too."""
        token = uuid.uuid4().hex
        for _ in range(2):
            load = self.register_daemons(daemons)
            reply = self.scripts.durable(
                "claim", what=f"claim of job {job_id}",
                job_hash=job_key(job_id), jobs_index=JOBS_INDEX, load_index=load,
                affinity_key=AFFINITY_PREFIX + cache_key if cache_key else "", job_id=job_id,
                delivery=delivery, token=token, ttl_ms=max(1, int(ttl_s * 1000)), limit=limit,
                affinity_wait=1 if affinity_wait else 0, job_ttl=self.result_ttl_s, worker=worker,
                domain=domain, body=body, queue_name=queue,
                export_lease=export_lease_key(export_key) if export_key else "",
                export_keep_s=self.result_ttl_s,
            )  # fmt: skip
            if reply[0] != 4:
                break
            self._registered.pop(load, None)  # the index is gone (a Redis that lost its data)
        if reply[0] == 0:
            return Finished(dict(json.loads(reply[1])))
        if reply[0] in (1, 3):
            return NotOurs(held=reply[0] == 1)
        _, gen, now_ms, cancelled, daemon, remembered, full, attempt, *history, export, export_other = reply
        enqueued, attempts, window, waiting, running, domain_before = (_text(v) for v in history)
        run = json.loads(running) if running else None
        if run is not None and run.get("gen") == int(gen):  # this claim's own (a retried reply)
            run = None
        return Claimed(
            token=token,
            gen=int(gen),
            redis_now=int(now_ms) / 1000,
            history=History(
                enqueued_at=float(enqueued),
                attempts=tuple(json.loads(attempts)) if attempts else (),
                window_start=_float(window),
                waiting_since=_float(waiting),
                running=run,
                previous_domain=domain_before or None,
            ),
            daemon=_text(daemon) or None,
            cancelled=bool(cancelled),
            preferred=_text(remembered) or None,
            preferred_full=bool(full),
            attempt=int(attempt),
            export=(_EXPORT_ANSWERS[int(export)], _text(export_other) or None) if int(export) else None,
        )

    def take_slot(
        self,
        fence: Fence,
        daemons: Sequence[str],
        *,
        limit: int,
        attempt: int,
        worker: str,
        avoid: str | None = None,
        only: str | None = None,
    ) -> str | None:
        """A slot on the least loaded of ``daemons`` that is up and has room (``avoid`` only when no
        other has; ``only``: that daemon alone); None when none has room, or the claim is no longer
        ours."""
        if not daemons:
            return None
        for _ in range(2):
            load = self.register_daemons(daemons)
            reply = self.scripts.call(
                "take_slot", job_hash=fence.keys.hash, load_index=load, gen=fence.gen, limit=limit,
                avoid=avoid or "", only=only or "", attempt=attempt, worker=worker,
            )  # fmt: skip
            if reply[0] != 4:
                break
            self._registered.pop(load, None)
        return (_text(reply[1]) or None) if reply[0] == 1 else None

    def renew(self, fence: Fence, *, ttl_s: float, phase: str | None = None) -> str:
        """Keep the lease (and write the build's ``phase``): ``ok``, ``cancel`` (kept, and a cancel
        was asked for) or ``fenced`` (another delivery claimed the job, or it finished: stop)."""
        reply = self.scripts.call(
            "renew", job_hash=fence.keys.hash, gen=fence.gen, ttl_ms=max(1, int(ttl_s * 1000)),
            phase=phase or "",
        )  # fmt: skip
        return {0: "fenced", 1: "ok", 2: "cancel"}[int(reply)]

    def requeue(
        self,
        fence: Fence,
        *,
        queue: str,
        message: bytes,
        tag: str,
        delivery: str,
        phase: str,
        attempts: Sequence[dict[str, Any]],
        window_start: float,
        waiting_since: float | None,
        avoid: str | None,
        export: ExportRelease | None = None,
    ) -> bool:
        """Publish the job's next message and give back the claim, at once (see ``lua/requeue.lua``);
        False (nothing published) when the claim is no longer ours. ``export``: the export lease
        the attempt held, given back in the same step whatever the claim's fence says."""
        return bool(
            self.scripts.durable(
                "requeue",
                what=f"requeue of job {fence.job_id}",
                queue=queue,
                job_hash=fence.keys.hash,
                jobs_index=JOBS_INDEX,
                waiting_index=WAITING_INDEX,
                export_lease=fence.export_lease(export),
                export_order=repr(export.order) if export is not None else "",
                message=message,
                tag=tag,
                delivery=delivery,
                gen=fence.gen,
                job_id=fence.job_id,
                phase=phase,
                attempts=json.dumps(list(attempts), separators=(",", ":")),
                window_start=repr(window_start),
                waiting_since=repr(waiting_since) if waiting_since is not None else "",
                avoid=avoid or "",
                ttl=self.result_ttl_s,
            )  # fmt: skip
        )

    def finish(
        self,
        fence: Fence,
        *,
        record: str,
        state: str,
        log: LogEnd | None = None,
        remember: tuple[str, str] | None = None,
        baseline: tuple[str, bytes, int, int] | None = None,
        keep_s: int = 0,
        export: ExportRelease | None = None,
    ) -> bool:
        """Store the final ``record`` and end the claim, at once (see ``lua/finish.lua``); False
        (nothing written) when the claim is no longer ours. ``log``: the log's last lines and how
        the stream is kept; ``remember``: (cache key, daemon) to remember (a success only);
        ``baseline``: (list key, entry, N, TTL s); ``keep_s``: how long Redis keeps the finished
        job's hash from now (0: until its TTL, ``BUILDQ_RESULT_TTL_S`` from the submit); ``export``:
        the export lease the build held, given back in the same step whatever the claim's fence says."""
        k = fence.keys
        end = log or LogEnd()
        base_key, base_entry, base_n, base_ttl = baseline or ("", b"", 0, 0)
        cache, daemon = remember or ("", "")
        return bool(
            self.scripts.durable(
                "finish",
                what=f"result of job {fence.job_id}",
                job_hash=k.hash,
                jobs_index=JOBS_INDEX,
                log_stream=k.log,
                affinity_key=AFFINITY_PREFIX + cache if cache else "",
                baseline_list=base_key,
                record=record,
                state=state,
                gen=fence.gen,
                job_id=fence.job_id,
                done_channel=k.done,
                daemon=daemon,
                remember_ttl=self.result_ttl_s,
                baseline_entry=base_entry,
                baseline_n=base_n,
                baseline_ttl=base_ttl,
                log_trim="=" if end.exact else "~",
                log_maxlen=end.maxlen,
                log_ttl=end.ttl_s,
                log_attempt=end.attempt,
                log_lines=end.lines,
                band=final_band(state),
                keep_s=keep_s,
                export_lease=fence.export_lease(export),
                export_order=repr(export.order) if export is not None else "",
                exported="1" if export is not None and export.exported else "",
            )  # fmt: skip
        )

    def keep(self, job_id: str, seconds: int) -> None:
        """Keep the job's hash (its record) ``seconds`` from now, however long it was to be kept."""
        self.redis.expire(job_key(job_id), seconds)

    def reject(self, job_id: str, *, delivery: str, record: str, state: str = "failed") -> bool:
        """Store the record of a job found invalid, only for its current delivery while it has no
        record and no live lease; True when stored. ``job_id`` must be a valid job id."""
        k = job_keys(job_id)
        return bool(
            self.scripts.durable(
                "reject",
                what=f"record of job {job_id}",
                job_hash=k.hash,
                jobs_index=JOBS_INDEX,
                record=record,
                state=state,
                job_id=job_id,
                delivery=delivery,
                done_channel=k.done,
                ttl=self.result_ttl_s,
                band=final_band(state),
            )  # fmt: skip
        )

    def release(self, fence: Fence, *, error: str = "") -> bool:
        """Give back the lease and the slot while still ours; ``error`` (what interrupted the claim)
        is what the next claim's lost attempt will say."""
        return bool(
            self.scripts.call(
                "release",
                job_hash=fence.keys.hash,
                jobs_index=JOBS_INDEX,
                gen=fence.gen,
                error=error[:500],
                job_id=fence.job_id,
            )  # fmt: skip
        )

    def mark_dead(self, job_id: str, gen: int) -> None:
        """The run of claim generation ``gen`` is over (killed): a takeover waiting for it may go."""
        self.scripts.call("dead", job_hash=job_key(job_id), gen=gen)

    def dead_gen(self, job_id: str) -> int:
        """The highest claim generation whose run is known to be over (0: none)."""
        raw = self.redis.hget(job_key(job_id), "dead_gen")
        return int(raw) if raw else 0

    def held_by(self, job_id: str, worker: str) -> None:
        """``worker`` received the job's retry message and holds it until its ETA."""
        if not JOB_ID_RE.match(job_id):
            return
        pipe = self.redis.pipeline(transaction=False)
        key = job_key(job_id)
        pipe.hset(key, "held_by", worker)
        pipe.expire(key, self.result_ttl_s)
        pipe.execute()

    # -- workers -------------------------------------------------------------------------------
    def heartbeat(self, *, worker: str, domain: str, ttl_s: float, queues: Sequence[str] = ()) -> float:
        """This worker (and its domain) lives for ``ttl_s`` more, consuming ``queues``; the server
        clock (epoch s)."""
        now = self.scripts.call(
            "heartbeat", workers=WORKERS, domains=DOMAINS, epoch=EPOCH, queues=QUEUES, worker=worker,
            domain=domain, ttl_ms=max(1, int(ttl_s * 1000)), names=list(queues),
        )  # fmt: skip
        return int(now) / 1000

    def live(self, which: str = WORKERS) -> dict[str, float]:
        """The live members of ``WORKERS`` or ``DOMAINS`` with their expiry (epoch s), by the
        server clock (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(which, 0, -1, withscores=True)
        (sec, usec), members = pipe.execute()
        now_ms = sec * 1000 + usec // 1000
        return {_text(m): score / 1000 for m, score in members if score > now_ms}

    # -- reads ----------------------------------------------------------------------------------
    def lease_holder(self, job_id: str) -> str | None:
        """The token of the job's live lease (by the server clock), None when nobody holds it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hmget(job_key(job_id), ["lease", "lease_until"])
        (sec, usec), (token, until) = pipe.execute()
        if token is None or float(until or 0) <= sec * 1000 + usec // 1000:
            return None
        return _text(token)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.hexists(job_key(job_id), "cancel"))

    def info(self, job_id: str) -> dict[str, str]:
        """The job hash's fields (the record among them, once stored)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        return {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}

    def status_parts(self, job_id: str) -> tuple[dict[str, Any] | None, dict[str, str], float | None]:
        """The job's record, its hash's other fields and this Redis's epoch, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(job_key(job_id))
        pipe.get(EPOCH)
        fields, epoch = pipe.execute()
        info = {_text(a): _text(b) for a, b in fields.items()}
        raw = info.pop("record", None)
        return (json.loads(raw) if raw else None), info, _float(epoch)

    def result(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(job_key(job_id), "record")
        return json.loads(raw) if raw else None

    def wait_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """Block until the job's record is stored (or ``timeout`` passes); None on timeout.

        Subscribes to the job's "done" channel first, then reads the record (so a record stored in
        between is not missed), through one subscriber connection per thread kept between calls (a
        new connection per wait would cost more than the wait itself). The channel's message is the
        record itself (``lua/finish.lua``, ``lua/reject.lua``); a state word instead (a worker of an
        earlier version) means: read it.
        """
        pubsub = self._subscriber()
        channel = job_keys(job_id).done.encode()
        clean = False
        try:
            pubsub.subscribe(channel)
            deadline = None if timeout is None else time.monotonic() + timeout
            # read once Redis confirms the subscription: a record stored before is found then, and
            # one stored after is announced to us (a read sent before the confirmation, on the
            # other connection, could be served before the SUBSCRIBE took effect, and a message
            # published in between was never ours); then the job's message says when to read
            # again, and a re-read every RECHECK_S covers one lost with a connection
            check, recheck_at = False, time.monotonic() + RECHECK_S
            while True:
                now = time.monotonic()
                if check or now >= recheck_at:
                    record = self.result(job_id)
                    if record is not None:
                        clean = True
                        return record
                    check, recheck_at = False, now + RECHECK_S
                until = recheck_at if deadline is None else min(recheck_at, deadline)
                if deadline is not None and now >= deadline:
                    clean = True
                    return None
                message = pubsub.get_message(timeout=max(0.0, until - now))
                if message is None or message.get("channel") != channel:
                    continue
                if message.get("type") == "message":
                    record = _announced(message.get("data"))
                    if record is not None:  # the message is the record: no read of our own
                        clean = True
                        return record
                check = message.get("type") in ("message", "subscribe")
        finally:
            if clean:
                pubsub.unsubscribe(channel)
            else:  # broken or interrupted: start afresh next time
                self._local.__dict__.pop("pubsub", None)
                pubsub.close()

    def _subscriber(self) -> Any:
        """This thread's subscriber (made again in a forked child: sockets are not shared)."""
        held = getattr(self._local, "pubsub", None)
        if held is None or held[0] != os.getpid():
            # subscribe confirmations are read too: each says a subscription took effect
            held = (os.getpid(), self.redis.pubsub())
            self._local.pubsub = held
        return held[1]
