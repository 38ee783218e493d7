-- requeue: the holder of claim `gen` puts the job back on its queue (a retry after its backoff, or a
-- wait for a daemon) and gives back its claim, in one step: the next message is published before
-- the lease goes, so there is no moment when the job is nowhere. The history the next delivery
-- needs (attempts so far, where its time window starts, since when every daemon is down, the
-- daemon to avoid) is written by this worker here; the next message carries only the job. A job
-- put back to wait for a daemon is indexed in `waiting_index` (the gauges count it from there). The
-- cache ref's export lease the attempt held (if any) is given back first, fenced by its own holder
-- (export_fn.lua): an attempt that is retried exported nothing.
local queue = KEYS[1]
local job_hash = KEYS[2]
local jobs_index = KEYS[3]     -- the recent jobs (score enqueued_at while queued)
local waiting_index = KEYS[4]  -- jobs waiting for a daemon (score: when, server ms)
local export_lease = KEYS[5]   -- export:<cache key> to give back; '' when the attempt held none
local message = ARGV[1]        -- the next message (due after its countdown)
local tag = ARGV[2]            -- its delivery tag
local delivery = ARGV[3]       -- its delivery id: the job's current delivery from now on
local gen = ARGV[4]
local job_id = ARGV[5]
local phase = ARGV[6]          -- retry_wait | waiting_for_daemon
local attempts = ARGV[7]       -- JSON list of the attempt records so far
local window_start = ARGV[8]   -- epoch s (server clock): where the next attempt's window starts
local waiting_since = ARGV[9]  -- epoch s since every daemon is down, '' when not waiting for that
local avoid = ARGV[10]         -- the daemon the last attempt lost, '' for none
local ttl = tonumber(ARGV[11])
local export_order = ARGV[12]  -- the build's order (enqueued_at) for the export lease
-- -> 1 published (now, or by this very call before: its reply was lost) | 0 fenced out (nothing published)
if export_lease ~= '' then release_export(export_lease, job_id, export_order, '') end
local h = read(job_hash, {'delivery', 'gen', 'done_gen', 'slot', 'slot_load', 'enqueued_at'})
if h.delivery == delivery then return 1 end
if h.done_gen or h.gen ~= gen then return 0 end
redis.call('LPUSH', queue, message)
local set = {'state', 'queued', 'phase', phase, 'delivery', delivery, 'tag', tag, 'pushed_at', now,
  'attempts', attempts, 'window_start', window_start, 'lease_until', 0}
extend(set, give_back(h))
local gone = {'running', 'held_by', 'lease'}
if waiting_since ~= '' then extend(set, {'waiting_since', waiting_since}) else gone[#gone + 1] = 'waiting_since' end
if avoid ~= '' then extend(set, {'avoid', avoid}) else gone[#gone + 1] = 'avoid' end
redis.call('HSET', job_hash, unpack(set))
redis.call('HDEL', job_hash, unpack(gone))
redis.call('EXPIRE', job_hash, ttl)
redis.call('ZADD', jobs_index, tonumber(h.enqueued_at or '0'), job_id)
if phase == 'waiting_for_daemon' then
  redis.call('ZADD', waiting_index, now, job_id)
  redis.call('ZREMRANGEBYSCORE', waiting_index, '-inf', '(' .. (now - ttl * 1000))
else
  redis.call('ZREM', waiting_index, job_id)
end
return 1
