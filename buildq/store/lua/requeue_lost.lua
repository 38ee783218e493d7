-- requeue_lost: push back a job's message that the broker lost. The job has no result, nobody holds
-- its lease, and the message buildq keeps for it (the last one sent) is neither in its queue nor
-- delivered-and-unacknowledged: a Redis restart between kombu's BRPOP and its unacked record, or
-- writes the restart did not keep.
local job_hash = KEYS[1]
local result_key = KEYS[2]
local lease_key = KEYS[3]
local queued_index = KEYS[4]
local unacked = KEYS[5]        -- kombu's hash of delivered, unacknowledged messages
local job_id = ARGV[1]
-- -> 1 pushed back | 0 not lost (or finished: dropped from the index)
local h = redis.call('HMGET', job_hash, 'msg', 'queue', 'tag')
if (not h[1]) or redis.call('EXISTS', result_key) == 1 then
  redis.call('ZREM', queued_index, job_id)
  return 0
end
if redis.call('EXISTS', lease_key) == 1 then return 0 end
if h[3] and redis.call('HEXISTS', unacked, h[3]) == 1 then return 0 end
if redis.call('LPOS', h[2], h[1]) then return 0 end
redis.call('RPUSH', h[2], h[1])
return 1
