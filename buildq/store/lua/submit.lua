-- submit: a producer enqueues a job, once. Its message is pushed and the job hash written in one
-- step, timed by the server clock; a job id that was submitted before pushes nothing (a producer
-- that retries a submit whose reply it lost cannot make a second build). The message itself is
-- kept only in the queue: the job hash keeps the job, from which the janitor can make it again.
local queue = KEYS[1]          -- the broker's queue list
local job_hash = KEYS[2]
local jobs_index = KEYS[3]     -- the recent jobs, scored by state and enqueue time (keys.py)
local supersede_key = KEYS[4]  -- supersede:<the job's supersede_key>, '' when it has none
local message = ARGV[1]        -- the Celery message (contract/wire.py)
local tag = ARGV[2]            -- its delivery tag
local delivery = ARGV[3]       -- the delivery id the message carries
local job_id = ARGV[4]
local queue_name = ARGV[5]
local body = ARGV[6]           -- the job's JSON (for `buildq retry` and the janitor)
local retry_of = ARGV[7]       -- '' for none
local ttl = tonumber(ARGV[8])
local job_prefix = ARGV[9]     -- a job hash's name without its job id (supersede_fn.lua)
local cancels = ARGV[10]       -- the channel every pool process listens to (a superseded job's cancel)
-- -> {1, enqueued_at, superseded job ('' none)} queued (the older job of its supersede key, queued
--    or running, cancelled in the same step) | {0, enqueued_at} submitted before: nothing pushed
if redis.call('HEXISTS', job_hash, 'enqueued_at') == 1 then
  return {0, redis.call('HGET', job_hash, 'enqueued_at')}
end
-- to the microsecond: `buildq list` is newest first, and jobs submitted within one millisecond
-- (common: a submit takes a fraction of one) keep their order
local at = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('LPUSH', queue, message)
local fields = {'state', 'queued', 'enqueued_at', at, 'queue', queue_name, 'delivery', delivery,
  'tag', tag, 'job', body, 'pushed_at', now}
if retry_of ~= '' then
  fields[#fields + 1] = 'retry_of'
  fields[#fields + 1] = retry_of
end
redis.call('HSET', job_hash, unpack(fields))
redis.call('EXPIRE', job_hash, ttl)
redis.call('ZADD', jobs_index, at, job_id)
local superseded = ''
if supersede_key ~= '' then
  superseded = supersede(supersede_key, job_prefix, job_id, job_hash, tonumber(at), cancels, ttl)[1]
end
return {1, at, superseded}
