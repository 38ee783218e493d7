-- submit: a producer enqueues a job, once. Its message is pushed and the job hash written in one
-- step, timed by the server clock; a job id that was submitted before pushes nothing (a producer
-- that retries a submit whose reply it lost cannot make a second build).
local queue = KEYS[1]          -- the broker's queue list
local job_hash = KEYS[2]
local queued_index = KEYS[3]   -- jobs waiting for their first claim (the janitor's list)
local recent_index = KEYS[4]   -- `buildq list`
local message = ARGV[1]        -- the Celery message (contract/wire.py)
local tag = ARGV[2]            -- its delivery tag
local delivery = ARGV[3]       -- the delivery id the message carries
local job_id = ARGV[4]
local queue_name = ARGV[5]
local body = ARGV[6]           -- the job's JSON (for `buildq retry` and the janitor)
local retry_of = ARGV[7]       -- '' for none
local ttl = tonumber(ARGV[8])
local recent_max = tonumber(ARGV[9])
-- -> {1, enqueued_at} queued | {0, enqueued_at} submitted before: nothing pushed
if redis.call('EXISTS', job_hash) == 1 then
  return {0, redis.call('HGET', job_hash, 'enqueued_at') or ''}
end
local at = string.format('%.3f', now / 1000)
redis.call('LPUSH', queue, message)
redis.call('HSET', job_hash, 'state', 'queued', 'enqueued_at', at, 'queue', queue_name,
  'delivery', delivery, 'job', body, 'msg', message, 'tag', tag)
if retry_of ~= '' then redis.call('HSET', job_hash, 'retry_of', retry_of) end
redis.call('EXPIRE', job_hash, ttl)
redis.call('ZADD', queued_index, at, job_id)
-- `buildq list` is newest first: ordered to the microsecond, so jobs submitted within one
-- millisecond (common: a submit is a fraction of one) keep their order
local clock = redis.call('TIME')
redis.call('ZADD', recent_index, clock[1] .. '.' .. string.format('%06d', tonumber(clock[2])), job_id)
redis.call('ZREMRANGEBYRANK', recent_index, 0, -recent_max - 1)
redis.call('ZREMRANGEBYSCORE', recent_index, '-inf', '(' .. (now / 1000 - ttl))
return {1, at}
