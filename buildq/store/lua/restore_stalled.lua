-- restore_stalled: put back a delivered build message whose worker is gone (killed, or cut off from
-- Redis when Celery tried to hand it back): still unacknowledged while its job has no live lease and
-- no result. Celery's own restore waits for the visibility timeout (hours). A message waiting out a
-- retry's backoff (an ETA) is held by the worker that received it (`held_by`, written when it was
-- received): it is put back only once that worker's heartbeat is gone — or, when nobody said who
-- holds it, once its ETA is more than `grace_ms` past.
local unacked = KEYS[1]        -- kombu's hash of delivered, unacknowledged messages
local unacked_index = KEYS[2]  -- their delivery times
local lease_key = KEYS[3]
local result_key = KEYS[4]
local job_hash = KEYS[5]
local workers = KEYS[6]        -- live workers (heartbeats: expiry ms on the server clock)
local tag = ARGV[1]
local queue = ARGV[2]
local eta_ms = tonumber(ARGV[3])   -- the message's ETA (server clock, ms), 0 for none
local grace_ms = tonumber(ARGV[4])
-- -> 1 put back | 0 left alone
local payload = redis.call('HGET', unacked, tag)
if not payload then return 0 end
if redis.call('EXISTS', lease_key) == 1 or redis.call('EXISTS', result_key) == 1 then return 0 end
if eta_ms > 0 then
  local holder = redis.call('HGET', job_hash, 'held_by')
  if holder then
    local alive = redis.call('ZSCORE', workers, holder)
    if alive and tonumber(alive) > now then return 0 end
  elseif now < eta_ms + grace_ms then
    return 0
  end
end
local entry = cjson.decode(payload)
redis.call('RPUSH', queue, cjson.encode(entry[1]))
redis.call('HDEL', unacked, tag)
redis.call('ZREM', unacked_index, tag)
redis.call('HDEL', job_hash, 'held_by')
return 1
