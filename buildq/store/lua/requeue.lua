-- requeue: the holder of claim `gen` puts the job back on its queue (a retry after its backoff, or a
-- wait for a daemon) and gives back its claim, in one step: the next message is published before
-- the lease goes, so there is no moment when the job is nowhere. The history the next delivery
-- needs (attempts so far, where its time window starts, since when every daemon is down, the
-- daemon to avoid) is written by this worker here; the next message carries only the job.
local queue = KEYS[1]
local job_hash = KEYS[2]
local lease_key = KEYS[3]
local result_key = KEYS[4]
local slot_set = KEYS[5]       -- '' when the claim holds no slot
local queued_index = KEYS[6]
local message = ARGV[1]        -- the next message (due after `countdown`)
local tag = ARGV[2]            -- its delivery tag
local delivery = ARGV[3]       -- its delivery id: the job's current delivery from now on
local token = ARGV[4]
local gen = ARGV[5]
local job_id = ARGV[6]
local countdown = tonumber(ARGV[7])
local phase = ARGV[8]          -- retry_wait | waiting_for_daemon
local attempts = ARGV[9]       -- JSON list of the attempt records so far
local window_start = ARGV[10]  -- epoch s (server clock): where the next attempt's window starts
local waiting_since = ARGV[11] -- epoch s since every daemon is down, '' when not waiting for that
local avoid = ARGV[12]         -- the daemon the last attempt lost, '' for none
local ttl = tonumber(ARGV[13])
-- -> 1 published (now, or by this very call before: its reply was lost) | 0 fenced out (nothing published)
if redis.call('HGET', job_hash, 'delivery') == delivery then return 1 end
if not still_holds(job_hash, result_key, lease_key, token, gen) then return 0 end
redis.call('LPUSH', queue, message)
redis.call('HSET', job_hash, 'state', 'queued', 'phase', phase, 'delivery', delivery,
  'msg', message, 'tag', tag, 'attempts', attempts, 'window_start', window_start)
if waiting_since ~= '' then
  redis.call('HSET', job_hash, 'waiting_since', waiting_since)
else
  redis.call('HDEL', job_hash, 'waiting_since')
end
if avoid ~= '' then redis.call('HSET', job_hash, 'avoid', avoid) else redis.call('HDEL', job_hash, 'avoid') end
redis.call('HDEL', job_hash, 'running', 'held_by')
redis.call('EXPIRE', job_hash, ttl)
redis.call('ZADD', queued_index, now / 1000 + countdown, job_id)
redis.call('DEL', lease_key)
if slot_set ~= '' then redis.call('ZREM', slot_set, token) end
return 1
