"""Re-sending submitted builds whose message the broker lost before any worker took it.

Celery's Redis transport moves a message from the queue list to its ``unacked`` hash in two
steps (``BRPOP``, then ``HSET``); a Redis restart between them loses the message. The client
therefore keeps each message it sends in the job's hash and indexes the job in
``buildq:queued`` until a worker claims it. :func:`requeue_lost` (run periodically by every worker)
pushes the message back for a job that is still ``queued`` after ``after_s``, was never claimed,
has no result, and whose message is neither in its queue nor unacknowledged. One Lua script per
job makes the check-and-push atomic, so several workers never push the same message twice; and a
spurious push could only lead to a duplicate delivery, which the job lease turns into a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .state import QUEUED_INDEX, JobStore, job_key, lease_key, result_key

log = logging.getLogger("buildq.janitor")

#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash
UNACKED_KEY = "unacked"

_REQUEUE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'claims', 'msg', 'queue', 'tag')
if (not h[3]) or h[2] or h[1] ~= 'queued' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if h[5] and redis.call('HEXISTS', KEYS[5], h[5]) == 1 then return 0 end
if redis.call('LPOS', h[4], h[3]) then return 0 end
redis.call('RPUSH', h[4], h[3])
return 1
"""


def requeue_lost(store: JobStore, *, after_s: float, now: float | None = None, batch: int = 200) -> list[str]:
    """Push back the messages of jobs lost before pickup; return their job ids."""
    script = store.redis.register_script(_REQUEUE)
    cutoff = (time.time() if now is None else now) - after_s
    requeued = []
    for raw in store.redis.zrangebyscore(QUEUED_INDEX, "-inf", cutoff, start=0, num=batch):
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        keys = [job_key(job_id), result_key(job_id), lease_key(job_id), QUEUED_INDEX, UNACKED_KEY]
        if script(keys=keys, args=[job_id]):
            requeued.append(job_id)
    if requeued:
        log.warning("re-sent %d build message(s) the broker lost: %s", len(requeued), ", ".join(requeued))
    return requeued


def start_janitor(store: JobStore, *, after_s: float, every_s: float) -> Callable[[], None]:
    """Run :func:`requeue_lost` every ``every_s`` seconds in a daemon thread; returns ``stop``."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                requeue_lost(store, after_s=after_s)
            except Exception as exc:  # noqa: BLE001 - Redis may be down; try again next round
                log.info("lost-message check skipped: %s", exc)

    threading.Thread(target=loop, name="buildq-janitor", daemon=True).start()
    return stop.set
