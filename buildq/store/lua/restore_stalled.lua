-- restore_stalled: put back a delivered build message whose worker is gone (killed, or cut off from
-- Redis when Celery tried to hand it back): still unacknowledged while its job has no live lease and
-- no result. Celery's own restore waits for the visibility timeout (hours). A message waiting out a
-- retry's backoff in a live worker is left alone.
local unacked = KEYS[1]        -- kombu's hash of delivered, unacknowledged messages
local unacked_index = KEYS[2]  -- their delivery times
local lease_key = KEYS[3]
local result_key = KEYS[4]
local job_hash = KEYS[5]
local tag = ARGV[1]
local queue = ARGV[2]
-- -> 1 put back | 0 left alone
local payload = redis.call('HGET', unacked, tag)
if not payload then return 0 end
if redis.call('EXISTS', lease_key) == 1 or redis.call('EXISTS', result_key) == 1 then return 0 end
if redis.call('HGET', job_hash, 'phase') == 'retry_wait' then return 0 end
local entry = cjson.decode(payload)
redis.call('RPUSH', queue, cjson.encode(entry[1]))
redis.call('HDEL', unacked, tag)
redis.call('ZREM', unacked_index, tag)
return 1
